"""Seeded random corruptions of everything a user hands blade: configs, shards, manifests, tokenizers and
checkpoints. For each one: blade either accepts it or refuses it with one line (a BladeError, no other
exception), in bounded time on 2 ranks, and nothing already written is lost (the checkpoint before
the corrupted one still resumes)."""
import glob
import json
import os
import random
import shutil

import pytest
import torch
import yaml

from blade.config import load_config
from blade.data.reader import ShardDataset
from blade.data.tokenizer import load_tokenizer
from blade.errors import BladeError
from tests.conftest import ROOT, TINY, tiny_overrides
from tests.dist_harness import run_distributed

VALUES = ["x", -1, 0, 1, 2.5, 1e12, None, True, [], {}, "1e-3", [1, 2], {"a": 1}, "", "off", "null"]


def one_line(error: Exception) -> bool:
    return isinstance(error, BladeError) and "\n" not in str(error) and str(error).strip() != ""


def flip_bytes(path: str, rng: random.Random, n: int = 8) -> None:
    data = bytearray(open(path, "rb").read())
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    open(path, "wb").write(bytes(data))


def truncate(path: str, rng: random.Random) -> None:
    with open(path, "r+b") as f:
        f.truncate(rng.randrange(max(1, os.path.getsize(path))))


def test_configs(tmp_path):
    rng = random.Random(0)
    base = yaml.safe_load(open(os.path.join(ROOT, "configs", "quickstart.yaml")))
    keys = [(s, k) for s, section in base.items() if isinstance(section, dict) for k in section]
    accepted = refused = 0
    for case in range(150):
        raw = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            section, key = rng.choice(keys)
            if rng.random() < 0.15:
                key = key + rng.choice(["_", "s", "x"])  # a typo
            if rng.random() < 0.05:
                raw[section] = rng.choice(VALUES)
            elif isinstance(raw.get(section), dict):
                raw[section][key] = rng.choice(VALUES)
        path = tmp_path / f"c{case}.yaml"
        text = yaml.safe_dump(raw) if rng.random() < 0.9 else yaml.safe_dump(raw)[: rng.randrange(200)] + ": ["
        path.write_text(text)
        try:
            load_config(str(path))
            accepted += 1
        except Exception as e:  # noqa: BLE001 - the point: which kind
            assert one_line(e), (case, text, repr(e))
            refused += 1
    assert refused > 100 and accepted + refused == 150
    # not vacuous: the same path accepts the unmutated config (random mutations rarely leave it valid:
    # with the keys of today's quickstart.yaml none of the 150 does)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    load_config(str(tmp_path / "base.yaml"))


@pytest.mark.parametrize("seed", range(6))
def test_shards_manifests_and_tokenizers(tmp_path, builtin_data, seed):
    rng = random.Random(seed)
    data = str(tmp_path / "train")
    shutil.copytree(os.path.join(builtin_data, "train"), data)
    shards = sorted(glob.glob(os.path.join(data, "*.tar")))
    manifest_file = os.path.join(data, "manifest.json")
    manifest = json.load(open(manifest_file))
    what = ["truncate shard", "flip shard", "drop shard", "manifest types", "manifest garbage",
            "tokenizer"][seed]
    if what == "truncate shard":
        truncate(rng.choice(shards), rng)
    elif what == "flip shard":
        flip_bytes(rng.choice(shards), rng, n=64)
    elif what == "drop shard":
        os.remove(rng.choice(shards))
    elif what == "manifest types":
        key = rng.choice(["seq_len", "vocab_size", "shards", "tokenizer", "sources"])
        manifest[key] = rng.choice(VALUES)
        json.dump(manifest, open(manifest_file, "w"))
    elif what == "manifest garbage":
        open(manifest_file, "w").write(json.dumps(manifest)[: rng.randrange(100)])
    else:
        tokenizer = os.path.join(data, "tokenizer.model")
        flip_bytes(tokenizer, rng, n=32) if rng.random() < 0.5 else truncate(tokenizer, rng)
        try:
            load_tokenizer(tokenizer)
        except Exception as e:  # noqa: BLE001
            assert one_line(e), repr(e)
        return
    for policy in ("error", "skip"):
        try:
            ds = ShardDataset(data, vocab_size=512, on_bad_shard=policy)
            for i in range(len(ds)):
                ds[i]
        except Exception as e:  # noqa: BLE001
            assert one_line(e), (what, policy, repr(e))
            assert policy == "error" or what.startswith("manifest"), (what, repr(e))  # skip: shards never stop it


# ----------------------------------------------------------------------------- checkpoints


def _build_run(rank, world, overrides):
    from blade.runtime.dist import World
    from blade.train.loop import Trainer

    Trainer(load_config(TINY, overrides), World(rank, world, rank, "cpu")).fit()


def _resume_attempts(rank, world, attempts):
    from blade.runtime import run_lock
    from blade.runtime.dist import World
    from blade.train.loop import Trainer

    out = []
    for overrides in attempts:
        try:
            tr = Trainer(load_config(TINY, overrides), World(rank, world, rank, "cpu"))
            out.append(("ok", tr.start_step))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which judges it
            out.append(("error", str(e), one_line(e)))
        run_lock.release(overrides_dir(overrides))
    return out


def overrides_dir(overrides):
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir="))


def _corrupt_checkpoint(ckpt: str, how: str, rng: random.Random) -> None:
    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {ckpt}.ran",)

    if how == "state truncated":
        truncate(os.path.join(ckpt, "state.json"), rng)
    elif how == "state wrong types":
        state = json.load(open(os.path.join(ckpt, "state.json")))
        state["components"]["streams"] = rng.choice(VALUES)
        json.dump(state, open(os.path.join(ckpt, "state.json"), "w"))
    elif how == "rank file flipped":
        flip_bytes(os.path.join(ckpt, "rank_00001.pt"), rng, n=256)
    elif how == "rank file with a callable":
        torch.save({"rng": RunsCode()}, os.path.join(ckpt, "rank_00000.pt"))
    elif how == "optimizer file truncated on one rank":
        truncate(glob.glob(os.path.join(ckpt, "proxy", "*rank_1_*optim_states.pt"))[0], rng)
    elif how == "model states with a callable on one rank":
        torch.save({"module": RunsCode()}, glob.glob(os.path.join(ckpt, "proxy", "*rank_0_*model_states.pt"))[0])
    elif how == "engine directory missing":
        shutil.rmtree(os.path.join(ckpt, "reference"))


CHECKPOINT_CORRUPTIONS = ["state truncated", "state wrong types", "rank file flipped",
                          "rank file with a callable", "optimizer file truncated on one rank",
                          "model states with a callable on one rank", "engine directory missing"]


def test_checkpoints(tmp_path, builtin_data):
    """Each corruption of the newest checkpoint (step 4) is refused in one line on both ranks, no
    rank hangs, no pickled code runs, and the checkpoint before it (step 2) still resumes."""
    rng = random.Random(1)
    original = str(tmp_path / "original")
    common = ("selection.tau=2", "selection.k_ref_steps=1", "train.eval_interval=0", "dist.timeout_s=30")
    run_distributed(_build_run, 2, deepspeed=True, args=(tiny_overrides(
        builtin_data, original, "train.steps=4", "checkpoint.interval=2", *common),))
    attempts, dirs = [], []
    for i, how in enumerate(CHECKPOINT_CORRUPTIONS):
        run_dir = str(tmp_path / f"run{i}")
        shutil.copytree(original, run_dir)
        _corrupt_checkpoint(os.path.join(run_dir, "checkpoints", "step_000004"), how, rng)
        attempts.append(tiny_overrides(builtin_data, run_dir, "train.steps=6", "checkpoint.resume=auto", *common))
        dirs.append(run_dir)
    previous = tiny_overrides(builtin_data, dirs[0], "train.steps=6", *common,
                              f"checkpoint.resume={dirs[0]}/checkpoints/step_000002")
    results = run_distributed(_resume_attempts, 2, deepspeed=True, args=(attempts + [previous],), timeout=600)
    for rank_results in results:
        for how, got in zip(CHECKPOINT_CORRUPTIONS, rank_results):
            assert got[0] == "error" and got[2], (how, got)
            words = ("damaged", "corrupt", "missing", "another rank") + (("refused",) if "callable" in how else ())
            assert any(w in got[1] for w in words), (how, got)
        assert rank_results[-1] == ("ok", 2)  # nothing already written is lost
    assert not glob.glob(str(tmp_path / "run*" / "checkpoints" / "*.ran"))
