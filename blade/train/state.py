"""What of a Trainer goes into a checkpoint and how it comes back (the file layout: checkpoint.py).

    state, mine = capture(trainer, completed)   # global state (JSON) and this rank's state (torch)
    path = resume_point(trainer)                 # checkpoint.resume=none|auto|PATH -> a directory or None
    saved = restore(trainer, path)               # engines, streams, counters; RNG is set last by the caller

Global state: counters, data positions of every stream, the reference's cycle (trained yet, last sync
step), selection totals, the wandb id, the resolved config, data/tokenizer fingerprints and the model
shape. Per rank: RNG states, the diagnostics window (local counts not yet all-reduced), masked samples.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from blade.config import config_to_dict
from blade.errors import ConfigError
from blade.runtime import checkpoint, reshard


def engines(tr) -> dict:
    return {"proxy": tr.proxy, **({"reference": tr.reference} if tr.reference is not None else {})}


def streams(tr) -> dict:
    if not tr.uses_reference:
        return {"train": tr.train_stream}
    return {"train": tr.train_stream, "ref_target": tr.ref_target_stream, "ref_pool": tr.ref_pool_stream}


def datasets(tr) -> dict:
    found = {"train": tr.train_ds, "target": tr.target_ds, "val": tr.val_ds}
    return {name: ds for name, ds in found.items() if ds is not None}


def save(tr, completed: int) -> tuple[float, str]:
    """Write checkpoint `completed` (a collective); returns (seconds, path) and logs a record."""
    t0 = time.perf_counter()
    state, mine = capture(tr, completed)
    path = checkpoint.save(checkpoint.root(tr.cfg.run.dir), completed, engines(tr), state, mine,
                           tr.world.rank, tr.cfg.checkpoint.keep_last_n)
    seconds = time.perf_counter() - t0
    tr.log.log({"kind": "checkpoint", "step": completed - 1, "path": path, "save_time_s": seconds,
                "size_bytes": dir_size(path) if tr.world.is_main else 0})
    return seconds, path


def identity(tr) -> dict:
    """What a checkpoint must share with this run to be resumed (checkpoint.check_compatible)."""
    cfg = tr.cfg
    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in tr.proxy.module.named_parameters()}
    return {"world_size": tr.world.world_size, "zero_stage": cfg.deepspeed.zero_stage,
            "precision": cfg.train.precision, "strategy": cfg.selection.strategy,
            "ref_precision": cfg.selection.ref_precision if tr.uses_reference else None,
            "model_shape": shapes,
            "data": {"train": tr.train_ds.fingerprint,
                     "target": tr.target_ds.fingerprint if tr.uses_reference else None,
                     "val": tr.val_ds.fingerprint if tr.val_ds is not None else None,
                     "tokenizer": tr.train_ds.manifest["tokenizer"].get("sha256")}}


def capture(tr, completed: int) -> tuple[dict, dict]:
    d = tr.diagnostics
    state = {"format": checkpoint.FORMAT, "step": completed, **identity(tr),
             "counters": {"tokens_seen": tr.tokens_seen, "tokens_trained": tr.tokens_trained,
                          "nonfinite_skipped": tr.nonfinite_skipped, "nonfinite_streak": tr.nonfinite_streak},
             "reference": {"ready": tr.reference_ready, "last_sync_step": tr.last_sync_step},
             "streams": {name: s.state_dict() for name, s in streams(tr).items()},
             "diagnostics_run_total": [t.tolist() for t in d.run_total],
             "eval_pending": tr.eval_pending, "wandb_id": tr.wandb_id,
             "first_last": tr.log.first_last(), "config": config_to_dict(tr.cfg),
             "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "versions": {"torch": torch.__version__, "deepspeed": _deepspeed_version()}}
    mine = {"rank": tr.world.rank, "rng": checkpoint.rng_state(),
            "diagnostics_window": [w.clone() for w in d.window], "last_score_mean": d.last_score_mean,
            "bad_samples": {name: sorted(ds.bad_samples) for name, ds in datasets(tr).items()}}
    return state, mine


def resume_point(tr) -> str | None:
    """The checkpoint to resume from (every rank resolves the same one); rank 0 then drops what
    comes after it: later checkpoints (moved to checkpoints/superseded/), torn saves, metric records."""
    ck, run_dir = tr.cfg.checkpoint, tr.cfg.run.dir
    ckpt_root = checkpoint.root(run_dir)
    if ck.resume == "none":
        newest = checkpoint.newest_complete(ckpt_root)
        if newest:
            raise ConfigError(f"config error: run.dir {run_dir} already holds checkpoint {newest}: "
                              "continue it with checkpoint.resume=auto, or start over in a new run.dir")
        return None
    path = checkpoint.newest_complete(ckpt_root) if ck.resume == "auto" else checkpoint.find_checkpoint(ck.resume)
    saved = checkpoint.read_state(path) if path else {"step": 0, "eval_pending": None}
    _barrier()  # every rank has chosen before anything moves
    if tr.world.is_main:
        if path is None:
            tr.say(f"no complete checkpoint in {ckpt_root}: starting from scratch")
        for moved in checkpoint.supersede_later(ckpt_root, saved["step"]):
            tr.say(f"moved {moved}: it continues a run that this resume abandons")
        if path and os.path.dirname(os.path.abspath(path)) == os.path.abspath(ckpt_root):
            checkpoint.write_atomic(os.path.join(ckpt_root, checkpoint.LATEST), os.path.basename(path) + "\n")
        for name in ("metrics.jsonl", "samples.jsonl"):
            checkpoint.truncate_records(os.path.join(run_dir, name), saved["step"], saved["eval_pending"])
    _barrier()
    return path


def restore(tr, path: str) -> dict:
    """Load a checkpoint into the engines, streams and counters; the RNG states wait in tr._saved_rng."""
    ck, t0 = tr.cfg.checkpoint, time.perf_counter()
    state = checkpoint.read_state(path)
    for warning in checkpoint.check_compatible({**state, "path": path}, identity(tr), ck.allow_data_change):
        tr.say(f"warning: {warning}")
    changes = checkpoint.config_changes(state["config"], config_to_dict(tr.cfg))
    if changes:
        tr.say("warning: the config differs from the checkpoint's, so the run will not continue "
               "bit-exactly: " + "; ".join(changes))
    if state["world_size"] == tr.world.world_size:
        mine = checkpoint.load(path, engines(tr), tr.world.rank)
    else:
        old, t = state["config"]["train"], tr.cfg.train
        before = old["micro_batch_size"] * old["grad_accum"] * state["world_size"]
        now = t.micro_batch_size * t.grad_accum * tr.world.world_size
        if before != now:
            tr.say(f"warning: the global batch changes from {before} to {now} sequences per step; keep it "
                   "with train.micro_batch_size or train.grad_accum")
        mine = reshard.load_resharded(path, engines(tr), tr.world.rank, tr.world.world_size,
                                      t.seed, state["step"])
    for name, stream in streams(tr).items():
        saved = state["streams"][name]
        stream.load_state_dict({**saved, "fingerprint": stream.ds.fingerprint} if ck.allow_data_change
                               else saved)
    counters = state["counters"]
    tr.tokens_seen, tr.tokens_trained = counters["tokens_seen"], counters["tokens_trained"]
    tr.nonfinite_skipped, tr.nonfinite_streak = counters["nonfinite_skipped"], counters["nonfinite_streak"]
    tr.reference_ready = state["reference"]["ready"]
    tr.last_sync_step = state["reference"]["last_sync_step"]
    d = tr.diagnostics
    for total, saved in zip(d.run_total, state["diagnostics_run_total"], strict=True):
        total.copy_(torch.tensor(saved, dtype=torch.float64))
    for window, saved in zip(d.window, mine["diagnostics_window"], strict=True):
        window.copy_(saved)
    d.last_score_mean = mine["last_score_mean"]
    for name, ds in datasets(tr).items():
        ds.bad_samples.update(mine["bad_samples"].get(name, []))
    tr.start_step = tr.last_saved = state["step"]
    tr.last_path, tr.eval_pending = path, state["eval_pending"]
    tr._saved_rng = mine["rng"]
    tr.say(f"resuming from {path} after {state['step']} steps (loaded in {time.perf_counter() - t0:.2f} s)")
    return state


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
