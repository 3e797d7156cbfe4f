"""Before anything is built: the data directories a config names exist, and their sequences fit the model
and each other (one-line ConfigErrors; `blade train --dry-run` runs it too)."""
from __future__ import annotations

import json
import os

from blade.config import STRATEGIES_WITH_REFERENCE, BladeConfig
from blade.errors import ConfigError


def check_paths(cfg: BladeConfig) -> dict[str, dict]:
    """Data directories must exist and hold manifest.json (target/val may be null), and their sequences
    must fit the model and each other. Returns {key: manifest} of the directories given."""
    manifests = {}
    if cfg.data.train is None:
        raise ConfigError("config error: data.train is required: the directory `blade prepare` wrote")
    dirs = [(f"data.{name}[{d}]" if isinstance(getattr(cfg.data, name), dict) else f"data.{name}", d)
            for name in ("train", "target", "val") for d in cfg.data.dirs(name)]
    for key, path in dirs:
        file = os.path.join(path, "manifest.json")
        if not os.path.isfile(file):
            raise ConfigError(f"config error: {key}: no manifest.json in '{path}' "
                              f"(run `blade prepare` first, or fix the path)")
        try:
            with open(file) as f:
                manifest = json.load(f)
            seq_len = int(manifest["seq_len"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"config error: {key}: cannot read seq_len from {file} ({e!r}); "
                              "re-run `blade prepare`") from None
        if seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"config error: the data's seq_len {seq_len} ({key}) exceeds "
                              f"model.max_seq_len {cfg.model.max_seq_len}; raise model.max_seq_len")
        manifests.setdefault(key.split("[")[0].removeprefix("data."), manifest)
    target = manifests.get("target")
    if cfg.selection.strategy in STRATEGIES_WITH_REFERENCE:
        if target is None:
            raise ConfigError(f"config error: selection.strategy={cfg.selection.strategy} needs data.target "
                              "(the target set the reference trains on)")
        if target["seq_len"] != manifests["train"]["seq_len"]:
            raise ConfigError(f"config error: data.target has seq_len {target['seq_len']} but data.train has "
                              f"{manifests['train']['seq_len']}: the reference trains on both in one batch; "
                              "prepare them with the same --seq-len")
    return manifests
