"""When a run selects and when its reference trains: the one source of the schedule, used by the step,
the dry-run plan and the experiment (docs/algorithm.md, "Schedule").

    steps 0 .. W-1          plain cross-entropy on every token (W = selection.warmup_full_ce_steps)
    blade                   reference phase (sync w <- u, K steps) before steps W, W + tau, W + 2 tau, ...
    rho1                    one reference phase (K0 steps on the target set) before step W
    random, rho1, blade     select from step W on; full never selects
"""
from __future__ import annotations

import math

from blade.config import STRATEGIES_WITH_REFERENCE, BladeConfig, SelectionConfig


def uses_reference(strategy: str) -> bool:
    return strategy in STRATEGIES_WITH_REFERENCE


def selecting(sel: SelectionConfig, step: int) -> bool:
    return sel.strategy != "full" and step >= sel.warmup_full_ce_steps


def reference_phase_before(sel: SelectionConfig, step: int) -> bool:
    """Whether the reference phase runs before proxy step `step`."""
    if not uses_reference(sel.strategy) or step < sel.warmup_full_ce_steps:
        return False
    since = step - sel.warmup_full_ce_steps
    return since == 0 if sel.strategy == "rho1" else since % sel.tau == 0


def steps_since_reference(sel: SelectionConfig, step: int) -> int | None:
    """Proxy steps since the last reference phase began (0: right after it); None without one yet."""
    if not uses_reference(sel.strategy) or step < sel.warmup_full_ce_steps:
        return None
    since = step - sel.warmup_full_ce_steps
    return since if sel.strategy == "rho1" else since % sel.tau


def n_reference_phases(sel: SelectionConfig, steps: int) -> int:
    """How many reference phases a run of `steps` proxy steps has (= reference_phase_before counted)."""
    after_warmup = max(0, steps - sel.warmup_full_ce_steps)
    if not uses_reference(sel.strategy) or after_warmup == 0:
        return 0
    return 1 if sel.strategy == "rho1" else math.ceil(after_warmup / sel.tau)


def describe_layout(cfg: BladeConfig, world_size: int, seq_len: int) -> str:
    """Dry-run summary: world layout, batch size, token budget and the selection schedule."""
    t, s = cfg.train, cfg.selection
    seqs = t.micro_batch_size * world_size * t.grad_accum
    tokens = seqs * seq_len
    seen = t.steps * tokens
    lines = [
        f"world:    {world_size} rank{'s' * (world_size != 1)} x micro-batch {t.micro_batch_size} "
        f"x grad accum {t.grad_accum}",
        f"batch:    {seqs:,} sequences x seq_len {seq_len} = {tokens:,} tokens per step",
    ]
    if s.strategy == "full":
        lines.append(f"budget:   {t.steps:,} steps -> {seen:,} tokens seen, all trained")
        lines.append("strategy: full (plain cross-entropy on every token)")
        return "\n".join(lines)
    warm = min(s.warmup_full_ce_steps, t.steps)
    trained = round(tokens * (warm + (t.steps - warm) * s.gamma))
    after = f" after {warm} full-CE steps" if warm else ""
    lines.append(f"budget:   {t.steps:,} steps -> {seen:,} tokens seen, ~{trained:,} trained "
                 f"(gamma {s.gamma}{after})")
    if s.strategy == "random":
        lines.append(f"strategy: random (keep a random gamma={s.gamma} of tokens)")
    elif s.strategy == "rho1":
        lines.append(f"strategy: rho1 (gamma {s.gamma}; static reference trained once for "
                     f"K0={s.rho1_ref_steps} steps)")
    else:
        syncs = n_reference_phases(s, t.steps)
        lines.append(f"strategy: blade (gamma {s.gamma}; reference re-synced every tau={s.tau} steps, "
                     f"then K={s.k_ref_steps} reference steps)")
        lines.append(f"syncs:    {syncs} reference syncs (ceil({t.steps - warm} / {s.tau})), "
                     f"{syncs * s.k_ref_steps:,} reference steps")
    return "\n".join(lines)
