"""The one home of ZeRO partition internals: which piece of a parameter this rank holds, where each
DeepSpeed optimizer wrapper keeps its fp32 master copy, and how to gather or release parameters.

Everything else (the reference sync, Dist(u, w), resharding, pretrained loading, the benchmark's
memory count) goes through these functions instead of reading DeepSpeed attributes itself. The
DeepSpeed facts behind them are in docs/deepspeed_cpu.md.
"""
from __future__ import annotations

import contextlib
import math

import torch

# Where each DeepSpeed optimizer wrapper keeps its fp32 master copy: ZeRO-3, ZeRO-1/2, BF16_Optimizer,
# and FP16_UnfusedOptimizer (stage 0 with bf16; a list of per-parameter lists).
_MASTER_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                 "fp32_groups_flat_partition", "fp32_groups")


def zero_stage(engine) -> int:
    return engine.zero_optimization_stage()


def reports_grad_norm(engine) -> bool:
    """Whether engine.get_global_grad_norm() answers after a step: not at stage 0 in fp32, where
    DeepSpeed clips without keeping the norm."""
    return zero_stage(engine) > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def grad_norm(engine) -> float:
    """The global L2 norm of the gradients below stage 1, where every rank holds the whole averaged
    gradient after the accumulation boundary's backward (float64)."""
    total = sum(float(p.grad.double().pow(2).sum()) for p in engine.module.parameters() if p.grad is not None)
    return math.sqrt(total)


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's shape as the model defines it (ZeRO-3 leaves an empty placeholder in p)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def full_numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())


def gathered(p: torch.nn.Parameter):
    """Context in which a ZeRO-3 partitioned parameter is whole and rank 0's changes are kept."""
    if not hasattr(p, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(p, modifier_rank=0)


def local_shards(engine) -> list[torch.Tensor]:
    """This rank's piece of every parameter: the ZeRO-3 partition, or the full tensor below stage 3."""
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in engine.module.parameters()]


def owned_part(p: torch.nn.Parameter, rank: int) -> torch.Tensor:
    """The elements of `p` that this rank owns, without the padding of the last ZeRO-3 partition
    (the whole tensor below stage 3)."""
    if not hasattr(p, "ds_tensor"):
        return p.data
    part = p.ds_tensor.numel()
    n = max(0, min(part, p.ds_numel - rank * part))
    return p.ds_tensor[:n]


def master_partitions(engine) -> list[torch.Tensor]:
    """This rank's fp32 master partitions, which ZeRO keeps apart from the working weights even in
    fp32 (empty at stage 0 in fp32, where the optimizer works on the parameters themselves)."""
    for attr in _MASTER_ATTRS:
        if hasattr(engine.optimizer, attr):
            groups = getattr(engine.optimizer, attr)
            return [t for g in groups for t in (g if isinstance(g, (list, tuple)) else [g])]
    return []


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (it holds the AdamW moments)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def drop_gathered(engine) -> None:
    """Release parameters a no-grad ZeRO-3 forward left gathered (docs/deepspeed_cpu.md, pitfall 2).

    `engine.empty_partition_cache()` would do the same plus a 300 ms gc.collect()."""
    if zero_stage(engine) == 3 and hasattr(engine.optimizer, "empty_partition_cache"):
        engine.optimizer.empty_partition_cache()


def reset_optimizer_state(engine) -> None:
    """A fresh AdamW: zero moments and step counters (what a newly created AdamW starts from)."""
    for state in base_optimizer(engine).state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()
