"""Runs against the exact one-step bi-level choice (the `oracle` records of blade/train/oracle.py): a
table and plots for the experiment report (blade/experiment/report.py) and tools/oracle_study.py.

Per run, over its measurements: the mean Spearman correlation of each ranking with the first-order
scores g_i . g_T and the precision@k of its set against the oracle's (chance: gamma); the first-order
gain of its set (random 0, oracle 1); the realised one-step change of the target loss of its AdamW
step minus random's, and the realised gain as a ratio of means, (dL_random - dL_set) / (dL_random -
dL_oracle) (a ratio per step explodes when the oracle's advantage is near 0). `runs` maps a name to
{"oracle": [records]} (the experiment's per-strategy results hold them under that key).
"""
from __future__ import annotations

import math
import os

from blade.inspect_run import _plt, oracle_names


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def _stderr(values: list[float]) -> float:
    m, n = _mean(values), len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")


def own_ranking(rows: list[dict]) -> str:
    """The ranking a run selects by: its strategy's scores (rho1, blade, random) or, for full, the loss."""
    strategy = rows[0]["strategy"]
    return strategy if f"spearman_{strategy}" in rows[0] else "loss"


def summarise(rows: list[dict]) -> dict:
    own = own_ranking(rows)
    out = {"measurements": len(rows), "own": own, "gamma": _mean([r["k"] / r["n_valid"] for r in rows])}
    for name in oracle_names(rows, "spearman_"):
        out[f"spearman_{name}"] = _mean([r.get(f"spearman_{name}") for r in rows])
        out[f"precision_{name}"] = _mean([r.get(f"precision_{name}") for r in rows])
    out["spearman_own_stderr"] = _stderr([r[f"spearman_{own}"] for r in rows])
    for name in oracle_names(rows, "dl_"):
        out[f"fo_gain_{name}"] = _mean([r.get(f"fo_gain_{name}") for r in rows])
        out[f"dl_vs_random_{name}"] = _mean([r[f"dl_{name}"] - r["dl_random"] for r in rows])
    span = out["dl_vs_random_oracle"]
    for name in oracle_names(rows, "dl_"):
        out[f"gain_{name}"] = out[f"dl_vs_random_{name}"] / span if span else float("nan")
    since = sorted({r["since_reference"] for r in rows if r.get("since_reference") is not None})
    out["spearman_by_since"] = {s: _mean([r[f"spearman_{own}"] for r in rows if r.get("since_reference") == s])
                                for s in since}
    return out


def _f(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def oracle_table(runs: dict) -> list[str]:
    """Markdown lines: one row per run with oracle records (none: no lines)."""
    summaries = {name: summarise(r["oracle"]) for name, r in runs.items() if r.get("oracle")}
    if not summaries:
        return []
    lines = ["| run | n | Spearman own (± s.e.) | Spearman loss | Spearman random | precision@k own (chance) | "
             "first-order gain own | ΔL own − random (1e-3) | ΔL oracle − random (1e-3) | realised gain own |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        own = s["own"]
        err = s["spearman_own_stderr"]
        err = "" if math.isnan(err) else f" ± {err:.3f}"
        lines.append(f"| {name} | {s['measurements']} | {_f(s[f'spearman_{own}'])}{err} | "
                     f"{_f(s['spearman_loss'])} | {_f(s['spearman_random'])} | {s[f'precision_{own}']:.3f} "
                     f"({s['gamma']:.2f}) | {_f(s.get(f'fo_gain_{own}'))} | "
                     f"{_f(1e3 * s[f'dl_vs_random_{own}'], 2)} | {_f(1e3 * s['dl_vs_random_oracle'], 2)} | "
                     f"{_f(s.get(f'gain_{own}'), 2)} |")
    return lines


def since_table(runs: dict) -> list[str]:
    """Markdown lines: mean Spearman of the run's own scores by proxy steps since its reference phase."""
    summaries = {name: summarise(r["oracle"]) for name, r in runs.items() if r.get("oracle")}
    summaries = {n: s for n, s in summaries.items() if s["spearman_by_since"]}
    if not summaries:
        return []
    since = sorted({k for s in summaries.values() for k in s["spearman_by_since"]})
    lines = ["| run | " + " | ".join(f"{k}" for k in since) + " |", "|---|" + "---|" * len(since)]
    for name, s in summaries.items():
        lines.append(f"| {name} | " + " | ".join(_f(s["spearman_by_since"].get(k), 2) for k in since) + " |")
    return lines


def plot_oracle_runs(runs: dict, colours: dict, path: str) -> bool:
    """Spearman of each run's own scores with g_i . g_T over steps, and by steps since its reference phase."""
    runs = {n: r["oracle"] for n, r in runs.items() if r.get("oracle")}
    if not runs:
        return False
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, rows in runs.items():
        own = own_ranking(rows)
        colour = colours.get(name)
        ax.plot([r["step"] for r in rows], [r[f"spearman_{own}"] for r in rows], "o-", ms=3, color=colour,
                label=f"{name} ({own})")
        by_since = summarise(rows)["spearman_by_since"]
        if by_since:
            bx.plot(list(by_since), list(by_since.values()), "o-", ms=3, color=colour, label=name)
    for a, x in ((ax, "step"), (bx, "steps since the reference phase")):
        a.axhline(0.0, color="black", lw=0.6)
        a.set_xlabel(x)
        a.set_ylabel("Spearman with g_i . g_T")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_oracle_report(run_dirs: dict[str, str], out_dir: str, command: str = "") -> str:
    """tools/oracle_study.py: oracle.md (the tables) and oracle_runs.png, plus each run's own
    three-panel plot (blade inspect's) as oracle_<run>.png, into out_dir; returns the path of oracle.md."""
    from blade.inspect_run import plot_oracle
    from blade.runtime.metrics import read_metrics

    os.makedirs(out_dir, exist_ok=True)
    records = {name: read_metrics(d) for name, d in run_dirs.items()}
    runs = {name: {"oracle": [r for r in rs if r["kind"] == "oracle"]} for name, rs in records.items()}
    colours = dict(zip(runs, [_plt().get_cmap("tab10")(i) for i in range(len(runs))]))
    plot_oracle_runs(runs, colours, os.path.join(out_dir, "oracle_runs.png"))
    for name, rs in records.items():
        plot_oracle(rs, os.path.join(out_dir, f"oracle_{name.replace(' ', '_').replace('=', '')}.png"))
    lines = ["# Against the exact one-step choice", "", *(["```", command, "```", ""] if command else []),
             *oracle_table(runs), "", "Spearman of the run's own scores by steps since its reference phase:", "",
             *since_table(runs), ""]
    path = os.path.join(out_dir, "oracle.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
