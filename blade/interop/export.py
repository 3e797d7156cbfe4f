"""`blade export`: a checkpoint's proxy as consolidated fp32 weights (model.safetensors), its model config
(config.yaml) and the data's tokenizer, and load_exported, which loads such a directory into a plain-torch
Transformer without DeepSpeed (docs/checkpointing.md, "Export").
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil

import torch

from blade.errors import CheckpointError
from blade.runtime.checkpoint import find_checkpoint, read_state, write_atomic
from blade.runtime.safe_load import load_deepspeed_file, refuse_unsafe


def export(checkpoint: str, out: str) -> dict:
    """Consolidated fp32 proxy weights (model.safetensors) + config.yaml (the model section) in `out`."""
    import yaml
    from safetensors.torch import save_file

    path = find_checkpoint(checkpoint)
    state = read_state(path)
    model_cfg = state["config"]["model"]
    tensors = proxy_fp32_state_dict(path)
    expected = {k: v for k, v in state["model_shape"].items()}
    if sorted(tensors) != sorted(expected):
        raise CheckpointError(f"checkpoint {path}: the proxy weights hold {sorted(tensors)[:4]}..., "
                              f"expected the parameters {sorted(expected)[:4]}...; the checkpoint is damaged")
    for name, t in tensors.items():
        if list(t.shape) != expected[name]:
            raise CheckpointError(f"checkpoint {path}: {name} has shape {list(t.shape)}, the model "
                                  f"config says {expected[name]}; the checkpoint is damaged")
    os.makedirs(out, exist_ok=True)
    meta = {"format": "blade-export-1", "source": os.path.abspath(path), "step": state["step"],
            "data": state["data"], "strategy": state["strategy"]}
    weights = os.path.join(out, "model.safetensors")
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, weights + ".tmp",
              metadata={"format": "blade-export-1", "step": str(state["step"])})
    os.chmod(weights + ".tmp", 0o644)
    os.replace(weights + ".tmp", weights)
    write_atomic(os.path.join(out, "config.yaml"), yaml.safe_dump({"model": model_cfg}, sort_keys=False))
    tokenizer = _tokenizer_file(state)
    if tokenizer:  # the tokenizer the data was prepared with, if it is still where training read it
        shutil.copyfile(tokenizer, os.path.join(out, os.path.basename(tokenizer)))
        meta["tokenizer"] = os.path.basename(tokenizer)
    write_atomic(os.path.join(out, "export.json"), json.dumps(meta, indent=1))
    return meta


def _tokenizer_file(state: dict) -> str | None:
    import hashlib

    train = state["config"]["data"]["train"]
    try:
        with open(os.path.join(train, "manifest.json")) as f:
            name = json.load(f)["tokenizer"]["file"]
        path = os.path.join(train, name)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return path if digest == state["data"]["tokenizer"] else None


def proxy_fp32_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The proxy's fp32 weights, consolidated over ranks (the master copy: exact in fp32 and bf16)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    proxy = os.path.join(path, "proxy")
    if not os.path.isdir(proxy):
        raise CheckpointError(f"checkpoint {path} has no proxy/ directory: it is damaged")
    try:
        if any("optim_states" in f for f in os.listdir(proxy)) and _zero_stage(path) > 0:
            # DeepSpeed's reader unpickles whatever its files hold: check them first
            refuse_unsafe(glob.glob(os.path.join(proxy, "*.pt")), f"the proxy weights in {path}")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                sd = get_fp32_state_dict_from_zero_checkpoint(path, tag="proxy")
        else:  # stage 0: the module weights are in the model states file
            sd = load_deepspeed_file(os.path.join(proxy, "mp_rank_00_model_states.pt"))["module"]
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises many kinds on damaged files
        raise CheckpointError(f"cannot read the proxy weights in {path} ({type(e).__name__}: "
                              f"{str(e)[:200]}): the checkpoint is damaged") from None
    names = set(read_state(path)["model_shape"])
    return {k: v.float() for k, v in sd.items() if k in names}


def _zero_stage(path: str) -> int:
    return int(read_state(path).get("zero_stage", 3))


def load_exported(path: str):
    """A blade Transformer (plain torch, fp32, eval mode) from a `blade export` directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from blade.config import ConfigError, load_config
    from blade.model.transformer import Transformer

    cfg_file, weights = os.path.join(path, "config.yaml"), os.path.join(path, "model.safetensors")
    for file in (cfg_file, weights):
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} not found: {path} is not a `blade export` directory")
    try:
        model_cfg = load_config(cfg_file).model
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt ({e}): export the checkpoint again") from None
    model = Transformer(model_cfg)
    params = dict(model.named_parameters())
    if set(tensors) != set(params):
        extra, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        raise CheckpointError(f"{weights} does not match {cfg_file}: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise CheckpointError(f"{weights}: {name} has shape {list(tensors[name].shape)}, "
                                      f"{cfg_file} says {list(p.shape)}")
            p.copy_(tensors[name])
    return model.eval()
