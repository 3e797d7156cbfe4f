"""The one home of ZeRO partition internals: which piece of a parameter this rank holds, where each
DeepSpeed optimizer wrapper keeps its fp32 master copy, and how to gather or release parameters.

Everything else (the reference sync, Dist(u, w), resharding, pretrained loading, the benchmark's
memory count) goes through these functions instead of reading DeepSpeed attributes itself. The
DeepSpeed facts behind them are in docs/deepspeed_cpu.md.
"""
from __future__ import annotations

import collections
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


def owned_range(p: torch.nn.Parameter, rank: int) -> tuple[int, int]:
    """The flat element range [start, end) of the whole parameter that this rank owns (everything
    below stage 3)."""
    if not hasattr(p, "ds_tensor"):
        return 0, p.numel()
    start = rank * p.ds_tensor.numel()
    return start, start + owned_part(p, rank).numel()


def owned_rows(p: torch.nn.Parameter, rank: int) -> tuple[int, int]:
    """The rows [r0, r1) (slices along dim 0) that hold this rank's elements: what a loader reads."""
    start, end = owned_range(p, rank)
    shape = full_shape(p)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return (start // row, -(-end // row)) if end > start else (0, 0)


def set_from_rows(p: torch.nn.Parameter, read_rows) -> int:
    """Set a parameter from `read_rows(r0, r1)`, which returns rows r0..r1 of its whole value: a ZeRO-3
    rank reads and copies only the rows that hold its part (no collective, no whole copy); below
    stage 3 every row. Returns the number of elements read."""
    from blade.runtime.dist import rank_and_world

    rank = rank_and_world()[0] if hasattr(p, "ds_tensor") else 0
    start, end = owned_range(p, rank)
    r0, r1 = owned_rows(p, rank)
    if r1 == r0:
        return 0
    rows = torch.as_tensor(read_rows(r0, r1)).flatten()
    offset = start - r0 * (rows.numel() // (r1 - r0))
    mine = owned_part(p, rank)
    mine.copy_(rows[offset:offset + end - start].view(mine.shape))
    return rows.numel()


def cast_partitions(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the ZeRO-3 partitions (and their placeholders) of a model built under zero.Init in fp32."""
    for p in model.parameters():
        p.ds_tensor.data = p.ds_tensor.data.to(dtype)
        p.data = p.data.to(dtype)


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


def full_fp32_state(engine, key: str | None = None) -> dict[str, torch.Tensor]:
    """Every parameter's whole fp32 master value (key None) or optimizer state `key` ("exp_avg",
    "exp_avg_sq"), by name, on every rank (CPU copies). A collective at ZeRO-3 (every rank calls it,
    one all-gather per parameter). Zeros before the optimizer's first step, as a fresh AdamW has.
    Stage 0 in fp32: the parameters are the masters (stage 0 in bf16 keeps its masters elsewhere and
    is refused by the one caller, blade/config.py)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = base_optimizer(engine).state
    out = {}
    for name, p in engine.module.named_parameters():
        if key is not None and not state:
            value = torch.zeros(full_shape(p))
        elif hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO-3; ZeRO-1/2 and bf16 wrappers
            value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        else:
            value = p.data if key is None else state[p][key]
        out[name] = value.detach().float().reshape(full_shape(p)).cpu().clone()
    return out


def weight_decays(engine) -> dict[str, float]:
    """The weight decay the engine's optimizer applies to each parameter, by name: read from its groups
    (ZeRO-3 sub-groups, ZeRO-1/2 and bf16 groups, or the plain optimizer's), i.e. what its step does."""
    base, opt = base_optimizer(engine).param_groups, engine.optimizer
    if hasattr(opt, "sub_group_to_group_id"):  # ZeRO-3: sub-group i belongs to source group [i]
        groups = [(params, base[opt.sub_group_to_group_id[i]]) for i, params in enumerate(opt.fp16_groups)]
    elif hasattr(opt, "bit16_groups") or hasattr(opt, "bf16_groups"):  # ZeRO-1/2; BF16_Optimizer
        groups = list(zip(getattr(opt, "bit16_groups", None) or opt.bf16_groups, base, strict=True))
    else:  # stage 0 in fp32: the torch optimizer holds the parameters themselves
        groups = [(g["params"], g) for g in base]
    by_id = {id(p): g["weight_decay"] for params, g in groups for p in params}
    return {name: by_id[id(p)] for name, p in engine.module.named_parameters()}


def optimizer_steps(engine) -> int:
    """The optimizer's step counter (AdamW's bias corrections use it): 0 before its first step."""
    for state in base_optimizer(engine).state.values():
        return int(state["step"])
    return 0


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (it holds the AdamW moments)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


@contextlib.contextmanager
def plain_linear():
    """torch's own F.linear inside: a ZeRO-3 build (deepspeed.zero.Init) replaces it process-wide with
    a memory-efficient autograd.Function, which torch.func cannot differentiate in forward mode."""
    import torch.nn.functional as F

    try:
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init
    except ImportError:
        Init = None
    original = getattr(Init, "linear_bk", None)
    if original is None or F.linear is original:
        yield
        return
    patched, F.linear = F.linear, original
    try:
        yield
    finally:
        F.linear = patched


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


# ----------------------------------------------------------------------------- a reference between phases

def _training_tensors(engine) -> list[tuple[torch.Tensor, bool]]:
    """What only training uses (ZeRO-3), and whether it must come back zeroed: fp32 masters, AdamW
    moments and gradient partitions do; the reduce buckets are scratch (torch.empty in DeepSpeed, and
    zeroing DeepSpeed's default 5e8-element bucket would touch 2 GB that the CPU otherwise never maps)."""
    opt = engine.optimizer
    out = [(t, True) for t in master_partitions(engine)]
    out += [(v, True) for state in base_optimizer(engine).state.values() for v in state.values()
            if torch.is_tensor(v) and v.dim() > 0]  # exp_avg, exp_avg_sq (not the 0-dim step)
    if getattr(opt, "grad_partitions_flat_buffer", None) is not None:
        out.append((opt.grad_partitions_flat_buffer, True))
    out += [(b.buffer, False) for b in getattr(opt, "ipg_buckets", {}).values()
            if getattr(b, "buffer", None) is not None]
    return out


def release_training_state(engine) -> int:
    """Free the storage of everything but the weights of a ZeRO-3 engine that will only run forwards
    until restore_training_state (a reference between its phases: the next sync overwrites the master,
    resets the moments, and the next backward rewrites the gradients). The tensors keep their shapes
    and their views; only the memory goes. Returns the bytes freed (0 below stage 3: nothing is done)."""
    if zero_stage(engine) != 3 or getattr(engine, "blade_released", None):
        return 0
    drop_gathered(engine)
    weights = {t.untyped_storage().data_ptr() for t in local_shards(engine)}
    released = {}
    for t, zeroed in _training_tensors(engine):
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in weights:
            released.setdefault(storage.data_ptr(), (storage, storage.nbytes(), zeroed))
    for storage, _, _ in released.values():
        storage.resize_(0)
    engine.blade_released = list(released.values())
    return sum(n for _, n, _ in engine.blade_released)


def _regrow(storage, nbytes: int, zeroed: bool = True) -> None:
    storage.resize_(nbytes)
    if zeroed:
        torch.empty(0, dtype=torch.uint8).set_(storage).zero_()


def restore_training_state(engine) -> None:
    """Give a released engine its training memory back, zero-filled but for the scratch buckets (the
    caller fills the master)."""
    for storage, nbytes, zeroed in getattr(engine, "blade_released", None) or []:
        _regrow(storage, nbytes, zeroed)
    engine.blade_released = None


@contextlib.contextmanager
def weights_only_state(engine):
    """While DeepSpeed saves a released engine: its fp32 master (where a ZeRO-3 checkpoint keeps the
    weights) holds the working weights, and its optimizer shows no moments, so the checkpoint is the
    weights alone. Released again afterwards. A no-op for an engine that is not released."""
    released = getattr(engine, "blade_released", None)
    if not released:
        yield
        return
    masters = master_partitions(engine)
    for master, lp in zip(masters, engine.optimizer.fp16_partitioned_groups_flat, strict=True):
        assert master.storage_offset() == 0, "a ZeRO-3 master group is expected to own its storage"
        _regrow(master.untyped_storage(), master.numel() * master.element_size())
        with torch.no_grad():
            master.copy_(lp)
    opt = base_optimizer(engine)
    state, opt.state = opt.state, collections.defaultdict(dict)
    try:
        yield
    finally:
        opt.state = state
        for master in masters:
            master.untyped_storage().resize_(0)
