"""The stages of an experiment: which run each (strategy, grid point, seed) needs, with what settings.

    --seeds 3                                   every continual run with seeds S, S+1, S+2
    --grid selection.tau=15,75                  one axis: blade at tau 15 and 75 (K, K0 re-derived)
    --grid selection.tau=15,75 selection.lam=0,1   one group: the product of its axes (4 points)
    --grid selection.tau=15,75 --grid selection.k_ref_steps=3,18   two groups: their union (one at a time)

A grid point is a set of overrides applied after the derived schedule. Each strategy takes from it
only the keys it reads (`reads`): blade ignores rho1's K0, rho1 ignores tau, K and lambda, random reads
gamma and eta, full none of the selection keys. A strategy whose settings at a point equal its settings
without the grid reuses that run, so `--grid selection.lam=0,1` adds blade runs only and
`--grid selection.k_ref_steps=3,18` adds blade runs and rho1 runs with the analogous K0 (blade's
total reference steps at that point).
"""
from __future__ import annotations

import itertools

from blade.config import SelectionConfig
from blade.errors import BladeError
from blade.train.schedule import n_reference_phases

BLADE_ONLY = ("selection.tau", "selection.k_ref_steps", "selection.lam")
RHO1_ONLY = ("selection.rho1_ref_steps",)
RANDOM_READS = ("selection.gamma", "selection.eta", "selection.warmup_full_ce_steps")
K_OVER_TAU = 0.3  # the paper's 300 of 1000


def scaled_schedule(steps: int, tau: int | None = None, k: int | None = None) -> dict:
    """The paper's schedule (5000 steps: tau 1000, K 300) scaled to `steps`, as continual.yaml says;
    a given tau keeps K = 0.3 tau unless K is given too; rho1's K0 = blade's total reference steps."""
    tau = max(1, round(steps / 5)) if tau is None else tau
    k = max(1, round(K_OVER_TAU * tau)) if k is None else k
    syncs = n_reference_phases(SelectionConfig(strategy="blade", tau=tau), steps)  # no warm-up
    return {"selection.tau": tau, "selection.k_ref_steps": k, "selection.rho1_ref_steps": syncs * k,
            "selection.diag_interval": max(1, max(1, round(steps / 5)) // 4)}


def split_override(item: str, what: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key or "." not in key:
        raise BladeError(f"{what} {item!r} is not section.key=value (e.g. selection.tau=50)")
    return key.strip(), value.strip()


def parse_grid(groups: list[list[str]]) -> list[dict[str, str]]:
    """--grid groups -> the grid points (each {key: value}), in order, without repeats."""
    points = []
    for group in groups:
        axes = []
        for item in group:
            key, values = split_override(item, "--grid")
            if key == "selection.strategy":
                raise BladeError("--grid selection.strategy: choose strategies with --strategies")
            vals = [v.strip() for v in values.split(",") if v.strip()]
            if not vals:
                raise BladeError(f"--grid {item!r} gives no values: list them as {key}=a,b")
            axes.append([(key, v) for v in vals])
        for combo in itertools.product(*axes):
            point = dict(combo)
            if point not in points:
                points.append(point)
    return points


def reads(strategy: str, key: str) -> bool:
    """Whether `strategy`'s run depends on the setting `key` (diag_interval only changes the logs)."""
    if not key.startswith("selection.") or key == "selection.diag_interval":
        return True
    if strategy == "full":
        return False
    if strategy == "random":
        return key in RANDOM_READS
    return key not in (BLADE_ONLY if strategy == "rho1" else RHO1_ONLY)


def stage_overrides(strategy: str, steps: int, overrides: list[str], point: dict[str, str]) -> list[str]:
    """The continual run's overrides for `strategy` at grid `point` ({} = no grid): the derived
    schedule, the command line's overrides, the point's values; the keys `strategy` does not read keep
    their values without the grid (so equal settings mean the same run)."""
    given = dict(split_override(o, "override") for o in overrides)

    def settings(p: dict) -> dict:
        merged = {**given, **p}
        tau, k = (_positive_int(merged, key) for key in ("selection.tau", "selection.k_ref_steps"))
        return {**{key: str(v) for key, v in scaled_schedule(steps, tau, k).items()}, **merged}

    default, at_point = settings({}), settings(point)
    out = {key: v for key, v in default.items() if not reads(strategy, key)}
    out.update({key: v for key, v in at_point.items() if reads(strategy, key)})
    ordered = [key for key in at_point if key in out] + [key for key in default if key not in at_point]
    return [f"{key}={out[key]}" for key in ordered]


def _positive_int(settings: dict, key: str) -> int | None:
    if key not in settings:
        return None
    try:
        value = int(settings[key])
    except ValueError:
        value = 0
    if value < 1:
        raise BladeError(f"{key}={settings[key]}: must be a positive integer (steps)")
    return value


def point_label(strategy: str, settings: list[str], default: list[str]) -> str:
    """`strategy` plus the settings that differ from its run without the grid, e.g. blade[lam=0]."""
    base = dict(split_override(o, "override") for o in default)
    diff = [(key, v) for key, v in (split_override(o, "override") for o in settings) if base.get(key) != v]
    if not diff:
        return strategy
    return f"{strategy}[" + ",".join(f"{key.rpartition('.')[2]}={v}" for key, v in diff) + "]"


def seed_list(seed: int, n: int) -> list[int]:
    if n < 1:
        raise BladeError(f"--seeds {n}: give at least 1 seed")
    return [seed + i for i in range(n)]
