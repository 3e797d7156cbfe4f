"""The proxy and reference DeepSpeed engines, and the reference sync by local partition copy.

Both engines are built from the same model class, model config, parameter groups and ZeRO config,
so every parameter is partitioned identically on every rank: rank r's shard of proxy parameter i has
the same shape as rank r's shard of reference parameter i. That makes the sync a purely local copy
(no collective traffic): the working weights (ZeRO-3 `ds_tensor`, or the full tensor for stages 0-2)
*and* the optimizer's fp32 master partitions, which ZeRO keeps as a separate copy even in fp32 and
which would otherwise overwrite the copied weights at the next reference step (notes: pitfall 1).
"""
from __future__ import annotations

import copy
import math

import torch

from blade.config import BladeConfig
from blade.model.transformer import Transformer

# Where each DeepSpeed optimizer wrapper keeps its fp32 master copy: ZeRO-3, ZeRO-1/2, BF16_Optimizer,
# and FP16_UnfusedOptimizer (stage 0 with bf16; a list of per-parameter lists).
_MASTER_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                 "fp32_groups_flat_partition", "fp32_groups")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg: BladeConfig, world_size: int, bf16: bool | None = None,
                     offload_params: bool = False) -> dict:
    """The DeepSpeed JSON config derived from the blade config (train_batch_size from the world size)."""
    t, o = cfg.train, cfg.optim
    zero = {"stage": cfg.deepspeed.zero_stage, "overlap_comm": cfg.deepspeed.overlap_comm,
            "contiguous_gradients": True}
    if offload_params and cfg.deepspeed.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True}},  # torch's AdamW: no JIT-compiled fused op needed
        "bf16": {"enabled": cfg.train.precision == "bf16" if bf16 is None else bf16},
    }
    return _deep_merge(ds, cfg.deepspeed.extra)


def lr_at(cfg: BladeConfig, step: int) -> float:
    """Scheduled learning rate for optimizer step `step` (0-based): linear warm-up, then decay."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    floor = o.lr * o.min_lr_ratio
    if o.schedule == "linear":
        return floor + (o.lr - floor) * (1.0 - progress)
    return floor + (o.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not norms (the same grouping for both twins keeps their partitions aligned)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def build_engine(cfg: BladeConfig, world_size: int, seed: int, schedule: bool,
                 bf16: bool | None = None, offload_params: bool = False):
    """One DeepSpeed engine around a freshly initialised Transformer (same seed => same init)."""
    import deepspeed

    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    if cfg.model.init_from:  # continual pretraining: every rank loads, before DeepSpeed partitions
        from blade.interop.pretrained import load_pretrained

        load_pretrained(model, cfg.model.init_from)
    scheduler = None
    if schedule:
        base = cfg.optim.lr
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt, lambda s: lr_at(cfg, s) / base)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=deepspeed_config(cfg, world_size, bf16, offload_params), lr_scheduler=scheduler)
    return engine


def zero_stage(engine) -> int:
    return engine.zero_optimization_stage()


def local_shards(engine) -> list[torch.Tensor]:
    """This rank's piece of every parameter: the ZeRO-3 partition, or the full tensor below stage 3."""
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in engine.module.parameters()]


def master_partitions(engine) -> list[torch.Tensor]:
    for attr in _MASTER_ATTRS:
        if hasattr(engine.optimizer, attr):
            groups = getattr(engine.optimizer, attr)
            return [t for g in groups for t in (g if isinstance(g, (list, tuple)) else [g])]
    return []  # stage 0 fp32: the optimizer works on the parameters themselves


def base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def drop_gathered(engine) -> None:
    """Release parameters a no-grad ZeRO-3 forward left gathered (notes: pitfall 2).

    `engine.empty_partition_cache()` would do the same plus a 300 ms gc.collect()."""
    if zero_stage(engine) == 3 and hasattr(engine.optimizer, "empty_partition_cache"):
        engine.optimizer.empty_partition_cache()


def reset_optimizer_state(engine) -> None:
    """A fresh AdamW: zero moments and step counters (what a newly created AdamW starts from)."""
    for state in base_optimizer(engine).state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


def set_lr(engine, lr: float) -> None:
    for group in base_optimizer(engine).param_groups:
        group["lr"] = lr


@torch.no_grad()
def sync_reference(proxy, reference) -> None:
    """w <- u by copying this rank's partitions; the reference optimizer restarts from scratch."""
    drop_gathered(reference)
    drop_gathered(proxy)
    for src, dst in zip(local_shards(proxy), local_shards(reference), strict=True):
        dst.copy_(src)
    for src, dst in zip(master_partitions(proxy), master_partitions(reference), strict=True):
        dst.copy_(src)
    reset_optimizer_state(reference)


@torch.no_grad()
def relative_distance(proxy, reference, world_size: int) -> float:
    """Dist(u, w) = ||u - w|| / ||u|| over all parameters, from local partitions + one all-reduce."""
    import torch.distributed as dist

    from blade.runtime.dist import all_reduce

    sharded = zero_stage(proxy) == 3
    sums = torch.zeros(2, dtype=torch.float64)
    rank = dist.get_rank() if dist.is_initialized() else 0
    for pu, pw in zip(proxy.module.parameters(), reference.module.parameters(), strict=True):
        if sharded:
            part = pu.ds_tensor.numel()
            n = max(0, min(part, pu.ds_numel - rank * part))  # the last partition is padded
            u, w = pu.ds_tensor[:n].double(), pw.ds_tensor[:n].double()
        else:
            u, w = pu.data.double(), pw.data.double()
        sums[0] += float((u - w).pow(2).sum())
        sums[1] += float(u.pow(2).sum())
    if sharded:
        all_reduce(sums)
    return float(sums[0].sqrt() / sums[1].sqrt().clamp_min(1e-30))
