"""The report of an experiment over several seeds and grid points: per run (a strategy at a grid
point) the mean ± standard error over seeds of the final and best target validation loss, the
differences against full and against rho1 of the same grid point paired by seed (t-test and sign
test, stats.py), tokens trained, training time and its cost per nat of improvement over the start
model; per-label and per-source selection rates when the data has them; loss curves with error bands.
The verdict is generated from these numbers and calls a difference noise unless its paired t-test
p-value is below stats.ALPHA.

One seed without a grid keeps the single-run report (report.py) in OUT/report/; otherwise the study
goes to OUT/report/ and each seed's single-run report of the runs without grid to OUT/report/seed<N>/.
"""
from __future__ import annotations

import json
import os

from blade.experiment import stats
from blade.experiment.report import (CLEAN, COLOURS, _label_name, _plt, _save, _table, collect,
                                     write_report)

PLOTS = (("val_loss_bands.png", "Target validation loss, mean ± s.e. over seeds"),
         ("final_loss.png", "Final target validation loss per run, mean ± s.e. over seeds"))


def write_reports(out_dir: str, rows: dict, seeds: list[int], base_val_loss: float | None,
                  meta: dict) -> str:
    """rows: label -> {"strategy", "runs": {seed: run_dir}, "versus": {strategy: label at its point}}
    (run.py); returns the path of the report.md on top."""
    plain = [label for label, row in rows.items() if label == row["strategy"]]
    if len(seeds) == 1 and len(plain) == len(rows):
        return write_report(out_dir, collect({label: rows[label]["runs"][seeds[0]] for label in plain},
                                             base_val_loss), meta)
    for seed in seeds:
        write_report(os.path.join(out_dir, f"seed{seed}"),
                     collect({label: rows[label]["runs"][seed] for label in plain}, base_val_loss),
                     {**meta, "title": f"Token selection experiment, seed {seed}", "seed": seed})
    study = collect_study(rows, base_val_loss)
    return write_study(out_dir, study, meta)


# ============================================================================ numbers


def collect_study(rows: dict, base_val_loss: float | None) -> dict:
    """Per run: its per-seed results (report.collect) and the statistics over seeds."""
    per_seed = {label: {seed: collect({label: d}, base_val_loss)["strategies"][label]
                        for seed, d in sorted(row["runs"].items())} for label, row in rows.items()}
    out = {}
    for label, row in rows.items():
        runs = per_seed[label]
        final = {seed: r["final_val_loss"] for seed, r in runs.items()}
        entry = {"strategy": row["strategy"], "versus": row["versus"], "runs": runs,
                 "final": stats.summary(list(final.values())),
                 "best": stats.summary([r["best_val_loss"] for r in runs.values()]),
                 "tokens_trained": stats.mean([r["tokens_trained"] for r in runs.values()]),
                 "wall_time_s": stats.summary([r["wall_time_s"] for r in runs.values()]),
                 "s_per_nat": None}
        if base_val_loss is not None and base_val_loss > entry["final"]["mean"]:
            gain = base_val_loss - entry["final"]["mean"]
            entry["s_per_nat"] = entry["wall_time_s"]["mean"] / gain
            entry["tokens_per_nat"] = entry["tokens_trained"] / gain
        for other in ("full", "rho1") if row["strategy"] == "blade" else ("full",):
            partner = row["versus"].get(other)
            if partner and partner != label:
                entry[f"vs_{other}"] = stats.paired(final, {s: r["final_val_loss"]
                                                            for s, r in per_seed[partner].items()})
                entry[f"vs_{other}"]["against"] = partner
        out[label] = entry
    return {"base_val_loss": base_val_loss, "rows": out}


def _label_shares(rows: dict) -> dict:
    """label -> strategy -> enrichment summary over seeds, for the selecting runs without grid."""
    out: dict = {}
    for label, r in rows.items():
        if label != r["strategy"] or r["strategy"] == "full":
            continue
        for run in r["runs"].values():
            for name, share in run["shares"].items():
                if share["enrichment"] is not None:
                    out.setdefault(name, {"base_rate": share["base_rate"]}).setdefault(label, []).append(
                        share["enrichment"])
    return out


# ============================================================================ report.md


def _pm(s: dict, digits: int = 4) -> str:
    se = "" if s["se"] is None else f" ± {s['se']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{se}"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def _loss_table(study: dict) -> list[str]:
    rows = study["rows"]
    best = min(rows, key=lambda n: rows[n]["final"]["mean"])
    out = []
    for label, r in rows.items():
        final = _pm(r["final"])
        out.append([label, str(r["final"]["n"]), f"**{final}**" if label == best else final, _pm(r["best"]),
                    _count(r["tokens_trained"]), _pm(r["wall_time_s"], 1),
                    "–" if r["s_per_nat"] is None else f"{r['s_per_nat']:.1f}",
                    "–" if r["s_per_nat"] is None else _count(r["tokens_per_nat"])])
    return _table(["run", "seeds", "final target val loss", "best", "tokens trained", "training time (s)",
                   "s per nat gained", "tokens trained per nat gained"], out)


def _comparisons(study: dict) -> list[tuple[str, dict]]:
    return [(label, r[key]) for label, r in study["rows"].items() for key in ("vs_full", "vs_rho1")
            if r.get(key)]


def _noise_word(c: dict) -> str:
    if c["p_t"] is None:
        return "one seed: no error bar"
    if not stats.beyond_noise(c):
        return "within noise"
    return "lower, beyond noise" if c["mean"] < 0 else "higher, beyond noise"


def _paired_table(study: dict) -> list[str]:
    out = [[label, c["against"], _pm({"mean": c["mean"], "se": c["se"]}), _sd(c["diffs"]),
            f"{c['lower']}/{c['n']}", _p(c["p_t"]), _p(c["p_sign"]), _noise_word(c)]
           for label, c in _comparisons(study)]
    return _table(["run", "against", "Δ final loss (paired mean ± s.e.)", "s.d. over seeds", "lower on seeds",
                   "t-test p", "sign test p", "verdict"], out)


def _sd(xs: list[float]) -> str:
    sd = stats.stdev(xs)
    return "–" if sd is None else f"{sd:.4f}"


def _share_table(shares: dict) -> list[str]:
    labels = list(dict.fromkeys(lab for v in shares.values() for lab in v if lab != "base_rate"))
    ordered = sorted(shares, key=lambda name: (name != CLEAN, -shares[name]["base_rate"]))
    body = [[_label_name(name), f"{100 * shares[name]['base_rate']:.2f} %"]
            + ["–" if lab not in shares[name] else _pm(stats.summary(shares[name][lab]), 2) + "×"
               for lab in labels] for name in ordered]
    return _table(["label", "base rate"] + labels, body)


def _source_table(rows: dict) -> list[str]:
    plain = {label: r for label, r in rows.items() if label == r["strategy"]}
    sources = list(dict.fromkeys(src for r in plain.values() for run in r["runs"].values()
                                 for src in run["source_rates"]))

    def cell(r, src):
        rates = [run["source_rates"][src] for run in r["runs"].values()
                 if run["source_rates"].get(src) is not None]
        return "–" if not rates else _pm({k: 100 * v if v is not None else None
                                          for k, v in stats.summary(rates).items()}, 2) + " %"

    return _table(["source"] + list(plain), [[src] + [cell(r, src) for r in plain.values()] for src in sources])


def _versus_line(label: str, c: dict) -> str:
    seeds = f"{c['n']} seed{'s' * (c['n'] > 1)}"
    se = "" if c["se"] is None else f" ± {c['se']:.4f}"
    tests = "" if c["p_t"] is None else f"; paired t-test p = {_p(c['p_t'])}, sign test p = {_p(c['p_sign'])}"
    return (f"{label} − {c['against']} = {c['mean']:+.4f}{se} nats ({seeds}, lower on {c['lower']}/{c['n']}"
            f"{tests}): {_noise_word(c)}.")


def verdict(study: dict) -> list[str]:
    rows = study["rows"]
    best = min(rows, key=lambda n: rows[n]["final"]["mean"])
    lines = [f"- Lowest mean final target validation loss: **{best}** ({_pm(rows[best]['final'])}, "
             f"{rows[best]['final']['n']} seeds)."]
    spreads = [sd for _, c in _comparisons(study) if (sd := stats.stdev(c["diffs"])) is not None]
    if spreads:
        lines.append(f"- Seed-to-seed spread: a paired difference varies between seeds with a standard "
                     f"deviation of {min(spreads):.4f} to {max(spreads):.4f} nats (Table 2); a single-seed "
                     "difference smaller than its comparison's spread is noise.")
    lines += [f"- {_versus_line(label, c)}" for label, c in _comparisons(study)]
    blade_vs_rho1 = {label: r["vs_rho1"] for label, r in rows.items()
                     if r["strategy"] == "blade" and r.get("vs_rho1")}
    if blade_vs_rho1:
        wins = [label for label, c in blade_vs_rho1.items() if stats.beyond_noise(c) and c["mean"] < 0]
        losses = [label for label, c in blade_vs_rho1.items() if stats.beyond_noise(c) and c["mean"] > 0]
        lines.append("- BLADE beats RHO-1 beyond noise (paired t-test p < "
                     f"{stats.ALPHA}) at: {', '.join(wins)}." if wins else
                     f"- No BLADE setting beats RHO-1 beyond noise (paired t-test p < {stats.ALPHA}).")
        if losses:
            lines.append(f"- RHO-1 beats BLADE beyond noise at: {', '.join(losses)}.")
    n = max(r["final"]["n"] for r in rows.values())
    if 1 < n < 6:
        lines.append(f"- With {n} seeds an exact two-sided sign test cannot go below {2 / 2 ** n:.3f}; "
                     "the t-test assumes roughly normal per-seed differences.")
    return lines


def _markdown(study: dict, meta: dict, images: list[str], seeds: list) -> str:
    lines = [f"# {meta.get('title', 'Token selection study')}", ""]
    if "command" in meta:
        lines += ["```", str(meta["command"]), "```", ""]
    lines += ["## Setup", ""] + [f"- {entry}" for entry in meta.get("setup", [])]
    if study["base_val_loss"] is not None:
        lines.append(f"- start model target validation loss: {study['base_val_loss']:.4f}")
    lines += ["", "## Table 1: target validation loss over seeds", "",
              "Mean ± standard error over seeds. A run is a strategy at a grid point, named by the settings "
              "that differ from the run without grid. Training time: the steps and reference phases. "
              "Cost: training time and tokens trained per nat of target loss gained over the start model.",
              ""] + _loss_table(study)
    lines += ["", "## Table 2: differences paired by seed", "",
              "Final target validation loss of the run minus that of full / rho1 at the same grid point "
              f"(rho1 with the analogous K0), seed by seed. \"beyond noise\": paired t-test p < {stats.ALPHA}.",
              ""] + _paired_table(study)
    shares = _label_shares(study["rows"])
    if shares:
        lines += ["", "## Table 3: enrichment per label (runs without grid)", "",
                  "Share of the selected tokens carrying the label ÷ its share of the seen tokens, mean ± s.e. "
                  "over seeds (1.00× = a uniform selection).", ""] + _share_table(shares)
    if any(run["source_rates"] for r in study["rows"].values() for run in r["runs"].values()):
        lines += ["", "## Table 4: selection rate per source (runs without grid)", ""]
        lines += _source_table(study["rows"])
    lines += ["", "## Plots", ""] + [f"![{title}]({name})\n" for name, title in PLOTS if name in images]
    lines += ["", "## Verdict", ""] + verdict(study)
    lines += ["", "Per-seed reports (labels, score histograms, Dist(u, w)): "
              + ", ".join(f"[seed {s}](seed{s}/report.md)" for s in seeds)]
    return "\n".join(lines) + "\n"


# ============================================================================ plots


def _colour(strategy: str) -> str:
    return COLOURS.get(strategy, "#009e73")


def plot_bands(study: dict, path: str) -> bool:
    """Mean curve of the runs without grid, with a ± 1 s.e. band over seeds (same eval steps)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in study["rows"].items():
        if label != r["strategy"]:
            continue
        curves = [run["curve"] for run in r["runs"].values()]
        length = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(length)]
        points = [stats.summary([c[i][2] for c in curves]) for i in range(length)]
        means = [p["mean"] for p in points]
        ses = [p["se"] or 0.0 for p in points]
        ax.plot(xs, means, "o-", ms=3, color=_colour(label), label=f"{label} ({len(curves)} seeds)")
        ax.fill_between(xs, [m - s for m, s in zip(means, ses)], [m + s for m, s in zip(means, ses)],
                        color=_colour(label), alpha=0.2)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("target validation loss (nats/token)")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return True


def plot_final(study: dict, path: str) -> bool:
    """Every run's final loss, mean ± s.e., one row per run (the grid included)."""
    rows = study["rows"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * len(rows)))
    for y, (label, r) in enumerate(reversed(rows.items())):
        ax.errorbar(r["final"]["mean"], y, xerr=r["final"]["se"] or 0.0, fmt="o", capsize=3,
                    color=_colour(r["strategy"]))
        ax.scatter([run["final_val_loss"] for run in r["runs"].values()], [y] * len(r["runs"]), s=8,
                   color=_colour(r["strategy"]), alpha=0.4)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(reversed(rows)), fontsize=8)
    ax.set_xlabel("final target validation loss (dots: seeds; bars: ± 1 s.e.)")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)
    return True


def _without_diagnostics(study: dict) -> dict:
    """The study for results.json: score histograms and Dist(u, w) stay in the per-seed reports."""
    heavy = ("score_hists", "dist_u_w")
    return {**study, "rows": {label: {**r, "runs": {seed: {k: v for k, v in run.items() if k not in heavy}
                                                    for seed, run in r["runs"].items()}}
                              for label, r in study["rows"].items()}}


def write_study(out_dir: str, study: dict, meta: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, **_without_diagnostics(study)}, f, indent=1)
    images = [name for (name, _), plot in zip(PLOTS, (plot_bands, plot_final))
              if plot(study, os.path.join(out_dir, name))]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(_markdown(study, meta, images, meta.get("seeds", [])))
    return path
