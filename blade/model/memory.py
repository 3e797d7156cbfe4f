"""Model-state memory by ZeRO stage, and the stage advice of `blade train --dry-run`.

Per parameter, a rank holds the working weights (2 bytes in bf16, 4 in fp32), their gradients (the
same), DeepSpeed's fp32 master copy (4; kept even in fp32, docs/deepspeed_cpu.md) and AdamW's two fp32
moments (8): 16 bytes in bf16, 20 in fp32 (the ZeRO paper's accounting, 2 + 2 + 12 for mixed
precision). ZeRO shards over the N ranks: stage 1 the master and moments, stage 2 also the gradients,
stage 3 also the weights. rho1 and blade train a second model (the reference) with its own optimizer,
so their state is the sum of both: the peak of a reference phase (at ZeRO-3 the reference keeps only
its weights between phases, blade/runtime/zero.py release_training_state). Activations are not counted: the advice keeps a share of the memory
free for them (FIT_SHARE).

Why it matters: below stage 3 each rank keeps the full weights, so forward and backward need no
per-layer all-gather; when the model fits unsharded, stage 1 or 2 is faster than 3 (docs/benchmarks/).
"""
from __future__ import annotations

import os

from blade.config import STRATEGIES_WITH_REFERENCE, BladeConfig, ModelConfig

FIT_SHARE = 0.6  # model state may take this share of a rank's memory; the rest is for activations
GIB = 2**30


def param_count(m: ModelConfig) -> int:
    """Parameters of blade's Transformer by formula (equals Transformer(m).num_params())."""
    kv = m.n_kv_heads * (m.dim // m.n_heads)
    block = 2 * m.dim * m.dim + 2 * m.dim * kv + 3 * m.dim * m.ffn_hidden + 2 * m.dim
    block += (m.dim + 2 * kv) if m.qkv_bias else 0
    head = 0 if m.tie_embeddings else m.vocab_size * m.dim
    return m.vocab_size * m.dim + m.n_layers * block + m.dim + head


def bytes_per_param(precision: str) -> dict[str, int]:
    low = 2 if precision == "bf16" else 4
    return {"weights": low, "grads": low, "optimizer": 12}  # fp32 master + two AdamW moments


def state_bytes_per_rank(params: int, precision: str, stage: int, world: int) -> float:
    b = bytes_per_param(precision)
    sharded = {0: (), 1: ("optimizer",), 2: ("optimizer", "grads"), 3: ("optimizer", "grads", "weights")}[stage]
    return sum(params * v / (world if k in sharded else 1) for k, v in b.items())


def model_state_bytes(cfg: BladeConfig, stage: int, world: int) -> float:
    """Bytes of model state per rank at ZeRO `stage`: the proxy, plus the reference for rho1 / blade."""
    params = param_count(cfg.model)
    total = state_bytes_per_rank(params, cfg.train.precision, stage, world)
    if cfg.selection.strategy in STRATEGIES_WITH_REFERENCE:
        ref = "bf16" if cfg.selection.ref_precision == "bf16" else cfg.train.precision
        total += state_bytes_per_rank(params, ref, stage, world)
    return total


def device_memory_per_rank(world: int) -> tuple[float, str]:
    """(bytes, where from): the GPU's memory, or the machine's RAM shared by its local ranks."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"{props.name} memory"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / max(1, local), f"RAM / {local} local rank{'s' * (local != 1)}"


def describe_memory(cfg: BladeConfig, world: int, budget_bytes: float | None = None) -> str:
    """The dry run's memory lines: model state per rank at every ZeRO stage against the memory of one
    rank (or `budget_bytes`), and whether the configured stage is the fast choice."""
    if budget_bytes is None:
        budget, source = device_memory_per_rank(world)
    else:
        budget, source = budget_bytes, "--memory-gib"
    stage = cfg.deepspeed.zero_stage
    per_stage = {s: model_state_bytes(cfg, s, world) for s in range(4)}
    fits = [s for s in range(4) if per_stage[s] <= FIT_SHARE * budget]
    lines = [f"memory:   {param_count(cfg.model):,} parameters; model state per rank "
             f"({cfg.train.precision}, weights + grads + fp32 master + AdamW"
             f"{', proxy + reference' if cfg.selection.strategy in STRATEGIES_WITH_REFERENCE else ''}): "
             + ", ".join(f"ZeRO-{s} {per_stage[s] / GIB:.2f} GiB" for s in range(4))
             + f"; {budget / GIB:.1f} GiB per rank ({source})"]
    limit = f"{FIT_SHARE:.0%} of a rank's memory, the rest for activations"
    if not fits:
        advice = f"does not fit even at ZeRO-3 within {limit}: more ranks, or selection.ref_offload"
    elif fits[0] < 3 and stage == 3:
        best = max(s for s in fits if s < 3)
        advice = (f"the weights fit unsharded (ZeRO-{best}: {per_stage[best] / GIB:.2f} GiB per rank, within "
                  f"{limit}): ZeRO-1/2 keep full weights and skip ZeRO-3's per-layer all-gathers, so they "
                  f"are faster; set deepspeed.zero_stage={best}")
    elif stage not in fits:
        advice = f"ZeRO-{stage} does not fit within {limit}: use deepspeed.zero_stage={fits[0]} or higher"
    elif stage == 3:
        advice = "ZeRO-3 is needed: the state fits only sharded"
    else:
        advice = f"ZeRO-{stage} fits within {limit}"
    lines.append(f"zero:     {advice}")
    return "\n".join(lines)
