"""The proxy and reference DeepSpeed engines, and the reference sync by local partition copy.

Both engines are built from the same model class, model config, parameter groups and ZeRO config,
so every parameter is partitioned identically on every rank: rank r's shard of proxy parameter i has
the same shape as rank r's shard of reference parameter i. That makes the sync a purely local copy
(no collective traffic): the working weights (ZeRO-3 `ds_tensor`, or the full tensor for stages 0-2)
*and* the optimizer's fp32 master partitions, which ZeRO keeps as a separate copy even in fp32 and
which would otherwise overwrite the copied weights at the next reference step (docs/deepspeed_cpu.md,
pitfall 1). The partition internals themselves live in blade/runtime/zero.py.
"""
from __future__ import annotations

import math

import torch

from blade.config import BladeConfig, deep_merge
from blade.model.compile import check_compile, compile_blocks
from blade.model.transformer import Transformer
from blade.runtime import zero
from blade.runtime.dist import all_reduce, rank_and_world
from blade.runtime.safe_load import SafeLoads
from blade.train.schedule import uses_reference


class Engines:
    """The proxy u and, for rho1 and blade, the reference w (None otherwise).

    Same seed => identical initial weights; same config => identical partitioning. A pretrained
    checkpoint (model.init_from) is loaded into the proxy only: the reference is synced from the
    proxy before its first use, so loading it too would be wasted work.
    Between its phases the reference only scores, so at ZeRO-3 it keeps only its weights: its master,
    moments and gradient buffers are released (zero.release_training_state) and come back at the
    next sync, which overwrites or resets all of them anyway.
    State: whether w has been trained yet (the DeepSpeed files hold the rest)."""

    def __init__(self, cfg: BladeConfig, world_size: int):
        sel, seed = cfg.selection, cfg.train.seed
        self.proxy = build_engine(cfg, world_size, seed, schedule=True, init_from=cfg.model.init_from)
        self.reference = None
        if uses_reference(sel.strategy):
            bf16 = True if sel.ref_precision == "bf16" else None
            self.reference = build_engine(cfg, world_size, seed, schedule=False, bf16=bf16,
                                          offload_params=sel.ref_offload)
            zero.release_training_state(self.reference)  # unused until the first sync
        self.reference_ready = False  # becomes True once w has been trained (first sync / rho1)

    def freeze_reference(self) -> None:
        """End of a reference phase: w only scores until the next sync."""
        self.reference.eval()
        zero.release_training_state(self.reference)
        self.reference_ready = True

    def by_name(self) -> dict:
        """{"proxy": ..., "reference": ...}: the engines a checkpoint saves, by directory name."""
        return {"proxy": self.proxy, **({"reference": self.reference} if self.reference is not None else {})}

    def state_dict(self) -> dict:
        return {"ready": self.reference_ready}

    def load_state_dict(self, state: dict) -> None:
        """After the engines' files are loaded. The reference only scores until the next sync (a
        checkpoint inside a phase has no reference files: the resumed phase syncs it from the proxy)."""
        self.reference_ready = state["ready"]
        if self.reference is not None:
            zero.release_training_state(self.reference)


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
            "torch_adam": True, **({"fused": True} if o.fused else {})}},  # torch's AdamW: no JIT op
        "bf16": {"enabled": cfg.train.precision == "bf16" if bf16 is None else bf16},
    }
    return deep_merge(ds, cfg.deepspeed.extra)


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
    """Decay matrices, not norms (the same grouping for both twins keeps their partitions aligned). By
    the parameters' model shapes: under zero.Init a parameter is an empty 1-D placeholder."""
    decay = [p for p in model.parameters() if len(zero.full_shape(p)) >= 2]
    other = [p for p in model.parameters() if len(zero.full_shape(p)) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def build_engine(cfg: BladeConfig, world_size: int, seed: int, schedule: bool,
                 bf16: bool | None = None, offload_params: bool = False, init_from: str | None = None):
    """One DeepSpeed engine around a freshly initialised Transformer (same seed => same init), with
    the weights of the pretrained checkpoint `init_from` when given; its blocks compiled when
    `train.compile`.

    At ZeRO-3 the model is built under deepspeed.zero.Init: each module's parameters are partitioned
    as soon as the module exists, so no rank ever holds more than its partitions plus one module's full
    parameters. The weights are those of a plain build for any world size (Transformer.init_weights
    sets each gathered parameter from rank 0's RNG; tests/test_engines.py checks 1, 2 and 4 ranks). The
    build runs in fp32 and the partitions are then cast to the engine's precision, which is what
    DeepSpeed does to a plain model (building in bf16 would compute the init and the RoPE tables in bf16)."""
    import deepspeed

    config = deepspeed_config(cfg, world_size, bf16, offload_params)
    sharded = cfg.deepspeed.zero_stage == 3
    if cfg.train.compile:
        check_compile("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with fp32_build(config, enabled=sharded):
        model = Transformer(cfg.model)
    if init_from:  # continual pretraining: every rank takes part (ZeRO-3: each keeps its partitions)
        from blade.interop.pretrained import load_pretrained

        load_pretrained(model, init_from)
    if sharded and config["bf16"]["enabled"]:
        zero.cast_partitions(model, torch.bfloat16)
    scheduler = None
    if schedule:
        base = cfg.optim.lr
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt, lambda s: lr_at(cfg, s) / base)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=config, lr_scheduler=scheduler)
    engine.checkpoint_engine = SafeLoads(engine.checkpoint_engine)  # loads never run code
    if cfg.train.compile:  # after initialize: DeepSpeed's hooks are in place, names unchanged
        compile_blocks(engine.module)
    return engine


def fp32_build(config: dict, enabled: bool):
    """deepspeed.zero.Init building in fp32. The dtype comes from the config, not from `dtype=`:
    DeepSpeed 0.19's zero.Init reads an explicit dtype as `dtype or fp16 if fp16_supported else bf16
    ...`, which on a CPU without fp16 support (e.g. AMD EPYC) builds bf16 partitions whatever dtype
    says (tests/test_engines.py checks the build's dtype)."""
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path={**config, "bf16": {"enabled": False}}, enabled=enabled)


def per_token_loss(engine, inputs: torch.Tensor, targets: torch.Tensor, grad: bool,
                   train_mode: bool = False) -> torch.Tensor:
    """Per-token CE [B, T] of `engine`. Without grad (scoring, evaluation) the forward runs in eval
    mode (no dropout) unless `train_mode` (the proxy scoring the batch it trains on), the engine's
    mode is restored after, and the parameters the no-grad ZeRO-3 forward left gathered are
    released."""
    if grad:
        return engine(inputs, targets)
    was_training = engine.module.training
    engine.train(train_mode)
    with torch.no_grad():
        loss = engine(inputs, targets)
    engine.train(was_training)
    zero.drop_gathered(engine)
    return loss


def set_lr(engine, lr: float) -> None:
    for group in zero.base_optimizer(engine).param_groups:
        group["lr"] = lr


@torch.no_grad()
def sync_reference(proxy, reference) -> None:
    """w <- u by copying this rank's partitions; the reference optimizer restarts from scratch."""
    zero.restore_training_state(reference)
    zero.drop_gathered(reference)
    zero.drop_gathered(proxy)
    for src, dst in zip(zero.local_shards(proxy), zero.local_shards(reference), strict=True):
        dst.copy_(src)
    for src, dst in zip(zero.master_partitions(proxy), zero.master_partitions(reference), strict=True):
        dst.copy_(src)
    zero.reset_optimizer_state(reference)


@torch.no_grad()
def relative_distance(proxy, reference, world_size: int) -> float:
    """Dist(u, w) = ||u - w|| / ||u|| over all parameters, from local partitions + one all-reduce."""
    sharded = zero.zero_stage(proxy) == 3
    rank = rank_and_world()[0]
    sums = torch.zeros(2, dtype=torch.float64)
    for pu, pw in zip(proxy.module.parameters(), reference.module.parameters(), strict=True):
        u, w = zero.owned_part(pu, rank).double(), zero.owned_part(pw, rank).double()
        sums[0] += float((u - w).pow(2).sum())
        sums[1] += float(u.pow(2).sum())
    if sharded:
        all_reduce(sums)
    return float(sums[0].sqrt() / sums[1].sqrt().clamp_min(1e-30))
