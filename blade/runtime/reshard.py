"""Resuming a ZeRO-3 checkpoint on another number of ranks (docs/checkpointing.md, "Different world size").

Each engine's full fp32 weights and Adam moments are rebuilt from the old ranks' partitions (the layout
zero_to_fp32 reads) and cut into this run's partitions; per-rank RNG states are re-derived from
(seed, step, rank). DeepSpeed's files are read with safe_load.load_deepspeed_file (weights_only=True).
"""
from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch

from blade.errors import CheckpointError
from blade.runtime.checkpoint import rng_state, set_rng_state
from blade.runtime.safe_load import load_deepspeed_file


def _rank_of(file: str) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(file)).group(1))


def consolidate_zero3(engine_dir: str) -> tuple[dict, dict]:
    """Full (unpartitioned) fp32 weights and Adam moments of a ZeRO-3 engine checkpoint written by any
    number of ranks: {name: {"fp32", "exp_avg", "exp_avg_sq"}}, and {"step", "lr_scheduler",
    "param_groups"}. Rank r's flat partition holds ceil(numel / world) elements of every parameter in
    order (the layout zero_to_fp32 reads). A reference saved between its phases holds no moments
    (blade/runtime/zero.py, weights_only_state): then only "fp32", and step None."""
    import glob

    optim = sorted(glob.glob(os.path.join(engine_dir, "*zero_pp_rank_*_optim_states.pt")), key=_rank_of)
    model = sorted(glob.glob(os.path.join(engine_dir, "*zero_pp_rank_*_model_states.pt")), key=_rank_of)
    if not optim or len(optim) != len(model) or [_rank_of(f) for f in optim] != list(range(len(optim))):
        raise CheckpointError(f"{engine_dir} does not hold one ZeRO-3 model and optimizer file per rank: "
                              "the checkpoint is damaged")
    world = len(optim)
    flats = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
    for file in optim:
        sd = load_deepspeed_file(file)["optimizer_state_dict"]
        state = sd["optimizer_state_dict"]["state"]
        flats["fp32"].append(torch.cat([t.flatten() for t in sd["fp32_flat_groups"]]))
        for key in ("exp_avg", "exp_avg_sq") if state else ():
            flats[key].append(torch.cat([state[i][key].flatten() for i in sorted(state)]))
    flats = {key: per_rank for key, per_rank in flats.items() if per_rank}
    meta = load_deepspeed_file(model[0])
    shapes = [(name, shape) for group in meta["param_shapes"] for name, shape in group.items()]
    full, offset = {}, 0
    for name, shape in shapes:
        numel = int(np.prod(shape))
        part = -(-numel // world)
        full[name] = {key: torch.cat([f[offset:offset + part] for f in per_rank])[:numel].view(shape).clone()
                      for key, per_rank in flats.items()}
        offset += part
    last = sd["optimizer_state_dict"]  # step and hyper-parameters are the same on every rank
    extra = {"step": last["state"][0]["step"] if last["state"] else None, "lr_scheduler": meta.get("lr_scheduler"),
             "param_groups": last["param_groups"]}
    return full, extra


@torch.no_grad()
def load_zero3_resharded(engine, full: dict, extra: dict, rank: int, world: int) -> None:
    """Set this rank's partitions (working weights, fp32 master, Adam moments) from full tensors."""
    from deepspeed.utils import (
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    from blade.runtime.zero import base_optimizer, drop_gathered, master_partitions, restore_training_state

    restore_training_state(engine)  # a released reference takes its master back (Engines releases it again)
    drop_gathered(engine)
    opt = base_optimizer(engine)
    for flat in master_partitions(engine) if extra["step"] is not None else ():
        state = opt.state[flat]  # AdamW creates its state at the first step: create it now
        for key in ("exp_avg", "exp_avg_sq"):
            state.setdefault(key, torch.zeros_like(flat))
        state["step"] = extra["step"].clone() if torch.is_tensor(extra["step"]) else extra["step"]
    for name, p in engine.module.named_parameters():
        if name not in full:
            raise CheckpointError(f"parameter {name} is missing from the checkpoint: the model differs")
        part = p.ds_tensor.numel()
        local = {}
        for key, value in full[name].items():
            padded = torch.zeros(part * world, dtype=torch.float32)
            padded[:value.numel()] = value.flatten()
            local[key] = padded[rank * part:(rank + 1) * part].to(p.ds_tensor.device)
        p.ds_tensor.data.copy_(local["fp32"])
        safe_set_local_fp32_param(p, local["fp32"])
        for key in ("exp_avg", "exp_avg_sq") if "exp_avg" in local else ():
            safe_set_local_optimizer_state(p, local[key], key)
    for group, saved in zip(opt.param_groups, extra["param_groups"]):
        group["lr"] = saved["lr"]
    if engine.lr_scheduler is not None and extra["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        for group, lr in zip(opt.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr


def load_resharded(path: str, engines: dict, rank: int, world: int) -> list[dict]:
    """Load the engines of a checkpoint written by another number of ranks (ZeRO-3): weights, fp32
    masters and Adam moments are re-partitioned exactly. Returns the old ranks' rank files, for the
    components to merge (blade/train/state.py); RNG states come from derived_rng_state."""
    for name, engine in engines.items():
        full, extra = consolidate_zero3(os.path.join(path, name))
        load_zero3_resharded(engine, full, extra, rank, world)
        del full
    files = sorted(glob.glob(os.path.join(path, "rank_*.pt")))
    if not files:
        raise CheckpointError(f"checkpoint {path} holds no rank_*.pt files: it is damaged")
    return [torch.load(f, weights_only=True) for f in files]


def derived_rng_state(seed: int, completed: int, rank: int) -> dict:
    """Fresh RNG states from (seed, completed steps, rank) without touching the current ones."""
    saved = rng_state()
    value = int(np.random.SeedSequence([seed, completed, rank]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # seeds CUDA too
    derived = rng_state()
    set_rng_state(saved)
    return derived
