"""What of a run goes into a checkpoint, and how it comes back (file layout: blade/runtime/checkpoint.py).

Every stateful component owns its state. `state_dict()` returns what is the same on every rank (JSON,
written once into state.json); `rank_state_dict()` what belongs to this rank (rank_00000.pt, ..., read with
weights_only=True); `load_state_dict` / `load_rank_state_dict` put it back. The loop hands over its
components as a (nested) mapping, e.g.

    {"loop": trainer, "counters": Counters, "reference": Engines, "diagnostics": SelectionDiagnostics,
     "metrics": MetricsLogger, "streams": {"train": DataStream, ...}, "data": {"train": ShardDataset, ...}}

and this module never reaches into them. Beside the components, state.json holds the run's identity
(what a resumed run must share: world size, precision, model shape, data fingerprints), the step, the
config and versions; each rank file holds the process's RNG states. The engines' weights and optimizer
states are DeepSpeed's own files. Checkpoints of the first format (blade-checkpoint-1, flat keys) are
read through `_from_format_1`.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

from blade.config import config_to_dict
from blade.errors import CheckpointError, ConfigError
from blade.runtime import checkpoint, reshard
from blade.runtime.dist import barrier
from blade.runtime.zero import full_shape
from blade.train.pending_phase import saved_engines


def collect(components: dict, method: str) -> dict:
    """{name: component.<method>()} for the components that have it, recursing into mappings."""
    out = {}
    for name, part in components.items():
        if isinstance(part, dict):
            out[name] = collect(part, method)
        elif hasattr(part, method):
            out[name] = getattr(part, method)()
    return out


def apply(components: dict, saved: dict, method: str) -> None:
    """The inverse of collect: component.<method>(saved[name]) for every saved entry."""
    for name, part in components.items():
        if name not in saved:
            continue
        if isinstance(part, dict):
            apply(part, saved[name], method)
        else:
            getattr(part, method)(saved[name])


def merge_rank_states(components: dict, old: list[dict], rank: int) -> dict:
    """This rank's component states after resharding from the old ranks' (each component merges)."""
    out = {}
    for name, part in components.items():
        saved = [o[name] for o in old if name in o]
        if not saved:
            continue
        out[name] = (merge_rank_states(part, saved, rank) if isinstance(part, dict)
                     else part.merge_rank_states(saved, rank))
    return out


def save(tr, completed: int) -> tuple[float, str]:
    """Write checkpoint `completed` (a collective); returns (seconds, path) and logs a record."""
    t0 = time.perf_counter()
    components = tr.components()
    state = {"format": checkpoint.FORMAT, "step": completed, **identity(tr),
             "components": collect(components, "state_dict"), "config": config_to_dict(tr.cfg),
             "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "versions": {"torch": torch.__version__, "deepspeed": _deepspeed_version()}}
    mine = {"rank": tr.world.rank, "rng": checkpoint.rng_state(),
            "components": collect(components, "rank_state_dict")}
    engines = saved_engines(tr.engines.by_name(), state["components"]["phase"])
    path = checkpoint.save(checkpoint.root(tr.cfg.run.dir), completed, engines, state, mine,
                           tr.world.rank, tr.cfg.checkpoint.keep_last_n)
    seconds = time.perf_counter() - t0
    tr.log.log({"kind": "checkpoint", "step": completed - 1, "path": path, "save_time_s": seconds,
                "size_bytes": dir_size(path) if tr.world.is_main else 0})
    return seconds, path


def identity(tr) -> dict:
    """What a checkpoint must share with this run to be resumed (check_compatible)."""
    cfg, data = tr.cfg, tr.datasets
    uses_reference = tr.engines.reference is not None
    return {"world_size": tr.world.world_size, "zero_stage": cfg.deepspeed.zero_stage,
            "precision": cfg.train.precision, "strategy": cfg.selection.strategy,
            "ref_precision": cfg.selection.ref_precision if uses_reference else None,
            "model_shape": {n: list(full_shape(p)) for n, p in tr.engines.proxy.module.named_parameters()},
            "data": {"train": data["train"].fingerprint,
                     "target": data["target"].fingerprint if uses_reference else None,
                     "val": data["val"].fingerprint if "val" in data else None,
                     "tokenizer": data["train"].manifest["tokenizer"].get("sha256")}}


def check_compatible(saved: dict, current: dict, allow_data_change: bool) -> list[str]:
    """Refuse (CheckpointError, one line) what cannot be resumed; return warnings for what can."""
    where = f"checkpoint {saved.get('path', '')}".strip()
    warnings = []
    if saved.get("world_size") != current.get("world_size"):
        if saved.get("zero_stage") == current.get("zero_stage") == 3:
            warnings.append(f"resharding from {saved.get('world_size')} to {current.get('world_size')} ranks: "
                            "weights, optimizer states and data positions carry over exactly; RNG states are "
                            "re-derived, so the run continues close to, not bit-exactly like, the original")
        else:
            raise CheckpointError(f"cannot resume from {where}: world size was {saved.get('world_size')}, this "
                                  f"run has {current.get('world_size')}; relaunch with the checkpoint's number "
                                  "of ranks (a different world size needs deepspeed.zero_stage=3)")
    for key, what, fix in (
            ("zero_stage", "deepspeed.zero_stage", "use the checkpoint's ZeRO stage"),
            ("precision", "train.precision", "use the checkpoint's precision"),
            ("ref_precision", "selection.ref_precision", "use the checkpoint's reference precision"),
            ("strategy", "selection.strategy", "use the checkpoint's strategy or start a new run.dir")):
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"cannot resume from {where}: {what} was {saved.get(key)!r}, this run "
                                  f"has {current.get(key)!r}; {fix}")
    if saved["model_shape"] != current["model_shape"]:
        names = sorted(set(saved["model_shape"]) | set(current["model_shape"]))
        diff = next(n for n in names if saved["model_shape"].get(n) != current["model_shape"].get(n))
        raise CheckpointError(f"cannot resume from {where}: the model shape differs ({diff}: "
                              f"{saved['model_shape'].get(diff)} in the checkpoint, "
                              f"{current['model_shape'].get(diff)} now); use the checkpoint's model config")
    if saved["data"]["tokenizer"] != current["data"]["tokenizer"]:
        raise CheckpointError(f"cannot resume from {where}: the data was tokenized with another tokenizer "
                              f"(sha256 {str(saved['data']['tokenizer'])[:12]} in the checkpoint, "
                              f"{str(current['data']['tokenizer'])[:12]} now); use the original data")
    for split in ("train", "target"):
        if saved["data"].get(split) != current["data"].get(split):
            msg = (f"the data.{split} shards differ from those the checkpoint was trained on "
                   "(fingerprint mismatch)")
            if not allow_data_change:
                raise CheckpointError(f"cannot resume from {where}: {msg}; resume with the original data, "
                                      "or set checkpoint.allow_data_change=true to continue on the new "
                                      "data at the same stream positions")
            warnings.append(msg + "; continuing at the saved positions (allow_data_change)")
    if saved["data"].get("val") != current["data"].get("val"):
        warnings.append("data.val differs from the checkpoint's: evaluation losses before and after "
                        "the resume are not comparable")
    return warnings


def config_changes(saved: dict, current: dict) -> list[str]:
    """`section.key: old -> new` for every setting that differs (bookkeeping sections left out)."""
    skip = {"run", "logging", "dist", "checkpoint"}
    changes = []
    for section, values in current.items():
        if section in skip or not isinstance(values, dict):
            continue
        for key, value in values.items():
            old = saved.get(section, {}).get(key, value)
            if old != value:
                changes.append(f"{section}.{key}: {old!r} -> {value!r}")
    return changes


def resume_point(cfg, world, say) -> str | None:
    """The checkpoint to resume from (every rank resolves the same one); rank 0 then drops what
    comes after it: later checkpoints (moved to checkpoints/superseded/), torn saves, metric records."""
    ck, run_dir = cfg.checkpoint, cfg.run.dir
    ckpt_root = checkpoint.root(run_dir)
    if ck.resume == "none":
        newest = checkpoint.newest_complete(ckpt_root)
        if newest:
            raise ConfigError(f"config error: run.dir {run_dir} already holds checkpoint {newest}: "
                              "continue it with checkpoint.resume=auto, or start over in a new run.dir")
        return None
    path = checkpoint.newest_complete(ckpt_root) if ck.resume == "auto" else checkpoint.find_checkpoint(ck.resume)
    step, eval_pending = 0, None
    if path:
        with _malformed(path):
            state = read_state(path)
            step, eval_pending = int(state["step"]), state["components"]["loop"]["eval_pending"]
    barrier()  # every rank has chosen before anything moves
    if world.is_main:
        if path is None:
            say(f"no complete checkpoint in {ckpt_root}: starting from scratch")
        for moved in checkpoint.supersede_later(ckpt_root, step):
            say(f"moved {moved}: it continues a run that this resume abandons")
        if path and os.path.dirname(os.path.abspath(path)) == os.path.abspath(ckpt_root):
            checkpoint.write_atomic(os.path.join(ckpt_root, checkpoint.LATEST), os.path.basename(path) + "\n")
        for name in ("metrics.jsonl", "samples.jsonl"):
            checkpoint.truncate_records(os.path.join(run_dir, name), step, eval_pending)
    barrier()
    return path


def restore(tr, path: str) -> dict:
    """Load a checkpoint into the engines and every component; returns the state with this rank's
    RNG states under "rng", which the caller sets last (nothing after it may draw random numbers)."""
    with _malformed(path):
        return _restore(tr, path)


def _restore(tr, path: str) -> dict:
    ck, t0 = tr.cfg.checkpoint, time.perf_counter()
    state = read_state(path)
    for warning in check_compatible({**state, "path": path}, identity(tr), ck.allow_data_change):
        tr.say(f"warning: {warning}")
    changes = config_changes(state["config"], config_to_dict(tr.cfg))
    if changes:
        tr.say("warning: the config differs from the checkpoint's, so the run will not continue "
               "bit-exactly: " + "; ".join(changes))
    world, components = tr.world, tr.components()
    engines = saved_engines(tr.engines.by_name(), state["components"].get("phase", {}))
    if state["world_size"] == world.world_size:
        mine = _rank_from_format_1(checkpoint.load(path, engines, world.rank))
    else:
        old, t = state["config"]["train"], tr.cfg.train
        before = old["micro_batch_size"] * old["grad_accum"] * state["world_size"]
        now = t.micro_batch_size * t.grad_accum * world.world_size
        if before != now:
            tr.say(f"warning: the global batch changes from {before} to {now} sequences per step; keep it "
                   "with train.micro_batch_size or train.grad_accum")
        old_ranks = reshard.load_resharded(path, engines, world.rank, world.world_size)
        merged = merge_rank_states(components, [_rank_from_format_1(o)["components"] for o in old_ranks],
                                   world.rank)
        mine = {"rng": reshard.derived_rng_state(t.seed, state["step"], world.rank), "components": merged}
    saved = state["components"]
    if ck.allow_data_change:  # the same positions in data whose fingerprint changed
        for name, stream in components["streams"].items():
            saved["streams"][name]["fingerprint"] = stream.ds.fingerprint
    apply(components, saved, "load_state_dict")
    apply(components, mine["components"], "load_rank_state_dict")
    tr.say(f"resuming from {path} after {state['step']} steps (loaded in {time.perf_counter() - t0:.2f} s)")
    return {**state, "rng": mine["rng"]}


@contextlib.contextmanager
def _malformed(path: str):
    """A state that parses but does not have the layout blade writes: one line, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {path} holds a malformed state ({type(e).__name__}: "
                              f"{str(e)[:100]}): it is damaged; use an earlier checkpoint") from None


def read_state(path: str) -> dict:
    """state.json of a checkpoint, in the current layout whatever format wrote it."""
    state = checkpoint.read_state(path)
    return _from_format_1(state) if state["format"] == checkpoint.FORMAT_1 else state


def _from_format_1(state: dict) -> dict:
    """blade-checkpoint-1 kept the components' state under flat keys of state.json."""
    state = dict(state)
    state["components"] = {
        "loop": {"eval_pending": state.pop("eval_pending")},
        "counters": state.pop("counters"),
        "reference": {"ready": state.pop("reference")["ready"]},
        "streams": state.pop("streams"),
        "diagnostics": {"run_total": state.pop("diagnostics_run_total")},
        "metrics": {"wandb_id": state.pop("wandb_id"), "first_last": state.pop("first_last")}}
    return state


def _rank_from_format_1(mine: dict) -> dict:
    if "components" in mine:
        return mine
    return {"rank": mine["rank"], "rng": mine["rng"], "components": {
        "diagnostics": {"window": mine["diagnostics_window"], "last_score_mean": mine["last_score_mean"]},
        "data": {name: {"bad_samples": samples} for name, samples in mine["bad_samples"].items()}}}


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
