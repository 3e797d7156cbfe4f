"""The report of one experiment: the same continued pretraining run once per selection strategy
(`full`, `random`, `rho1`, `blade`: same seed, data order and steps), evaluated on a held-out
target-domain validation set.

`collect` reads the run directories into a JSON-able dict; `write_report` writes results.json,
report.md and the plots: target validation loss, selection rates per noise label, score histograms
(paper Fig. 3), Dist(u, w) (Fig. 4). The verdict in report.md is generated from the numbers only.
Selection shares are over the tokens of the whole run (the `summary` record); label "none" is clean.
"""
from __future__ import annotations

import json
import math
import os

from blade.config import STRATEGIES
from blade.errors import BladeError
from blade.experiment.oracle_report import oracle_table, plot_oracle_runs
from blade.inspect_run import _plt
from blade.runtime.metrics import read_metrics

COLOURS = {"full": "#555555", "random": "#e69f00", "rho1": "#0072b2", "blade": "#d55e00"}
EXTRA_COLOURS = ("#009e73", "#cc79a7", "#56b4e9", "#f0e442")  # strategies outside STRATEGIES
CLEAN = "none"  # the label of unlabelled (clean) tokens
MAX_HISTS = 6   # score histograms drawn per strategy
DPI = 110


# ============================================================================ numbers


def selection_shares(by_label: dict) -> dict:
    """Per label: seen and selected token counts, base_rate = seen / all seen, selected_rate =
    selected / all selected, stderr = sqrt(base_rate (1 - base_rate) / all selected) (the sampling
    error of a uniform random selection's rate), enrichment = selected_rate / base_rate. Labels never
    seen are left out; with nothing selected the rates are None."""
    seen_all = sum(v["total"] for v in by_label.values())
    selected_all = sum(v["selected"] for v in by_label.values())
    shares = {}
    for label, v in by_label.items():
        if not v["total"]:
            continue
        base = v["total"] / seen_all
        rate = v["selected"] / selected_all if selected_all else None
        shares[label] = {"seen": v["total"], "selected": v["selected"], "base_rate": base,
                         "selected_rate": rate,
                         "stderr": math.sqrt(base * (1 - base) / selected_all) if selected_all else None,
                         "enrichment": None if rate is None else rate / base}
    return shares


def _by_step(records: list[dict], *kinds: str) -> list[dict]:
    """The records of these kinds in step order; of a step logged twice (a run that crashed without a
    checkpoint and reran it) the last."""
    last = {r["step"]: r for r in records if r["kind"] in kinds}
    return [last[step] for step in sorted(last)]


def _run_result(run_dir: str, base_val_loss: float | None) -> dict:
    records = read_metrics(run_dir)
    summaries = [r for r in records if r["kind"] == "summary"]
    evals = _by_step(records, "eval")
    if not summaries or not evals:
        missing = "summary" if evals else "eval"
        raise BladeError(f"report: no {missing} record in '{run_dir}/metrics.jsonl' (is the run finished?)")
    summary = summaries[-1]
    steps = _by_step(records, "train", "skip")
    curve = [[e["tokens_seen"], e["tokens_trained"], float(e["val_loss"])] for e in evals]
    losses = [point[2] for point in curve]
    if base_val_loss is not None:
        curve.insert(0, [0, 0, base_val_loss])
    return {"final_val_loss": losses[-1], "best_val_loss": min(losses),
            "tokens_seen": summary["tokens_seen"], "tokens_trained": summary["tokens_trained"],
            "curve": curve,
            "shares": selection_shares(summary.get("by_label") or {}),
            "source_rates": {s: v["rate"] for s, v in (summary.get("by_source") or {}).items()},
            "signals": {label: {"proxy_loss": v.get("proxy_loss"), "score": v.get("score")}
                        for label, v in (summary.get("by_label") or {}).items() if v["total"]},
            "score_hists": [{"step": d["step"], **d["score_hist"]} for d in _by_step(records, "diag")
                            if "score_hist" in d],
            "dist_u_w": [[r["step"], r["dist_u_w"]] for r in steps if "dist_u_w" in r],
            "oracle": _by_step(records, "oracle"),  # selection.exact_interval (blade/experiment/oracle_report.py)
            "wall_time_s": sum(r["step_time_s"] for r in steps)
            + sum(r["ref_phase_time_s"] for r in _by_step(records, "ref"))}


def collect(runs: dict[str, str], base_val_loss: float | None) -> dict:
    """Read each run directory (strategy -> dir) into {"base_val_loss", "strategies": {name: result}},
    strategies in the order full, random, rho1, blade, then any others as given."""
    rank = {name: i for i, name in enumerate(STRATEGIES)}
    names = sorted(runs, key=lambda n: rank.get(n, len(rank)))
    return {"base_val_loss": base_val_loss,
            "strategies": {name: _run_result(runs[name], base_val_loss) for name in names}}


def _label_rows(strategies: dict) -> list[tuple[str, float, float]]:
    """(label, base rate, stderr) per label: clean first, then by base rate descending. Base rates from
    the first run (all runs see the same tokens); the stderr of the run that selected the fewest tokens."""
    first = next(iter(strategies.values()))["shares"]
    rows = [(label, v["base_rate"], max(s["shares"].get(label, {}).get("stderr") or 0.0
                                        for s in strategies.values()))
            for label, v in first.items()]
    return sorted(rows, key=lambda row: (row[0] != CLEAN, -row[1]))


def _below_base(shares: dict) -> list[str]:
    """Labels selected below their base rate by more than 2 sampling errors."""
    return [label for label, v in shares.items()
            if v["selected_rate"] is not None and v["selected_rate"] < v["base_rate"] - 2 * v["stderr"]]


# ============================================================================ plots


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)


def _log_y(ax, unit: str) -> None:
    """Log-scale y axis with plain tick labels at 1, 2 and 5 times powers of ten."""
    from matplotlib.ticker import LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    for axis_set in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_set("{x:g}" + unit)


def plot_val_loss(strategies: dict, colours: dict, path: str) -> bool:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, column, xlabel in zip(axes, (0, 1), ("tokens seen", "tokens trained")):
        for name, s in strategies.items():
            ax.plot([p[column] for p in s["curve"]], [p[2] for p in s["curve"]], "o-", ms=4,
                    color=colours[name], label=name)
        ax.set_xlabel(xlabel)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("target validation loss (nats/token)")
    axes[0].legend()
    _save(fig, path)
    return True


def plot_selection_rates(strategies: dict, colours: dict, path: str) -> bool:
    """Share of selected tokens per label next to the base rate (log scale), and the enrichment."""
    rows = _label_rows(strategies)
    if not rows:
        return False
    plt = _plt()
    width = 0.8 / (len(strategies) + 1)
    xs = range(len(rows))
    fig_width = max(8, 1 + 0.3 * len(rows) * (len(strategies) + 1))
    fig, (shares_ax, enrich_ax) = plt.subplots(2, 1, figsize=(fig_width, 7), sharex=True)
    shares_ax.bar(xs, [100 * base for _, base, _ in rows], width, yerr=[200 * se for _, _, se in rows],
                  color="white", edgecolor="black", hatch="//", capsize=3, label="base rate (seen) ± 2 s.e.")
    enrich_ax.errorbar(xs, [1.0] * len(rows), yerr=[2 * se / base for _, base, se in rows], fmt="_",
                       color="black", capsize=3, label="random selection ± 2 s.e.")
    for i, (name, s) in enumerate(strategies.items(), start=1):
        pos = [x + i * width for x in xs]
        got = [s["shares"].get(label, {}) for label, _, _ in rows]
        shares_ax.bar(pos, [100 * (g.get("selected_rate") or 0.0) for g in got], width, color=colours[name],
                      label=name)
        enrich_ax.bar(pos, [(g.get("enrichment") or 0.0) - 1 for g in got], width, bottom=1.0,
                      color=colours[name])
    _log_y(shares_ax, " %")
    shares_ax.set_ylabel("share of tokens")
    shares_ax.legend(fontsize=8, ncol=2)
    _log_y(enrich_ax, "×")
    enrich_ax.axhline(1.0, color="grey", ls="--", lw=1)
    enrich_ax.set_ylabel("enrichment = selected / base")
    enrich_ax.legend(fontsize=8)
    enrich_ax.set_xticks([x + len(strategies) * width / 2 for x in xs])
    enrich_ax.set_xticklabels([_label_name(label) for label, _, _ in rows], rotation=30, ha="right")
    _save(fig, path)
    return True


def _evenly_spaced(items: list, k: int) -> list:
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def _centres(hist: dict) -> list[float]:
    return [(a + b) / 2 for a, b in zip(hist["edges"], hist["edges"][1:])]


def _hist_mean(hist: dict) -> float:
    return sum(c * x for c, x in zip(hist["counts"], _centres(hist))) / max(1, sum(hist["counts"]))


def plot_score_hists(strategies: dict, colours: dict, path: str) -> bool:
    runs = {name: s["score_hists"] for name, s in strategies.items() if s["score_hists"]}
    if not runs:
        return False
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False)
    for ax, (name, hists) in zip(axes[0], runs.items()):
        shown = _evenly_spaced(hists, MAX_HISTS)
        for i, h in enumerate(shown):
            total = max(1, sum(h["counts"]))
            density = [c / (total * (b - a)) for c, a, b in zip(h["counts"], h["edges"], h["edges"][1:])]
            ax.plot(_centres(h), density, color=cmap(i / max(1, len(shown) - 1)), label=f"step {h['step']}")
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_title(f"{name}: mean score {_hist_mean(shown[0]):.3f} → {_hist_mean(shown[-1]):.3f}",
                     color=colours[name])
        ax.set_xlabel("score = proxy loss − reference loss")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("density")
    _save(fig, path)
    return True


def plot_dist_u_w(strategies: dict, colours: dict, path: str) -> bool:
    runs = {name: s["dist_u_w"] for name, s in strategies.items() if s["dist_u_w"]}
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in runs.items():
        ax.plot(*zip(*points), "o-", ms=4, color=colours[name], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("Dist(u, w) = |u - w| / |u|")
    ax.legend()
    _save(fig, path)
    return True


# ============================================================================ report.md


def _label_name(label: str) -> str:
    return "clean" if label == CLEAN else label


def _pct(rate: float | None) -> str:
    return "–" if rate is None else f"{100 * rate:.2f} %"


def _share_cell(share: dict | None) -> str:
    if not share or share["selected_rate"] is None:
        return "–"
    return f"{_pct(share['selected_rate'])} ({share['enrichment']:.2f}×)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows]]


def _loss_table(strategies: dict) -> list[str]:
    best = min(strategies, key=lambda n: strategies[n]["final_val_loss"])
    full = strategies.get("full")
    rows = []
    for name, s in strategies.items():
        final = f"{s['final_val_loss']:.4f}"
        delta = "–" if full is None else f"{s['final_val_loss'] - full['final_val_loss']:+.4f}"
        rows.append([name, f"**{final}**" if name == best else final, f"{s['best_val_loss']:.4f}", delta,
                     f"{s['tokens_seen']:,}", f"{s['tokens_trained']:,}", f"{s['wall_time_s']:.1f}"])
    return _table(["strategy", "final target val loss", "best", "Δ final vs full", "tokens seen",
                   "tokens trained", "wall time (s)"], rows)


def _share_table(strategies: dict) -> list[str]:
    rows = [[_label_name(label), f"{_pct(base)} ± {200 * se:.2f}"]
            + [_share_cell(s["shares"].get(label)) for s in strategies.values()]
            for label, base, se in _label_rows(strategies)]
    return _table(["label", "base rate"] + list(strategies), rows)


def _source_table(strategies: dict) -> list[str]:
    sources = list(dict.fromkeys(src for s in strategies.values() for src in s["source_rates"]))
    rows = [[src] + [_pct(s["source_rates"].get(src)) for s in strategies.values()] for src in sources]
    rows.append(["all sources"] + [_pct(s["tokens_trained"] / max(1, s["tokens_seen"]))
                                   for s in strategies.values()])
    return _table(["source"] + list(strategies), rows)


def _signal_table(strategies: dict) -> list[str]:
    scored = [n for n, s in strategies.items() if any(v["score"] is not None for v in s["signals"].values())]
    header = ["label"] + [f"{n} ℓ(u)" for n in strategies] + [f"{n} s" for n in scored]

    def cell(value):
        return "–" if value is None else f"{value:.3f}"

    rows = [[_label_name(label)]
            + [cell(s["signals"].get(label, {}).get("proxy_loss")) for s in strategies.values()]
            + [cell(strategies[n]["signals"].get(label, {}).get("score")) for n in scored]
            for label, _, _ in _label_rows(strategies)]
    return _table(header, rows)


def _versus(name: str, loss: float, other: str, other_loss: float) -> str:
    diff = loss - other_loss
    if diff == 0:
        return f"{name}'s final target validation loss is {loss:.4f}, equal to {other}'s."
    word = "lower" if diff < 0 else "higher"
    return (f"{name}'s final target validation loss is {loss:.4f}, {abs(diff):.4f} {word} than {other}'s "
            f"({other_loss:.4f}).")


def _verdict(strategies: dict) -> list[str]:
    final = {name: s["final_val_loss"] for name, s in strategies.items()}
    best = min(final, key=final.get)
    lines = [f"- Lowest final target validation loss: **{best}** ({final[best]:.4f})."]
    lines += [f"- {_versus(best, final[best], other, final[other])}" for other in final if other != best]
    if "blade" in final and "rho1" in final:
        beats = "yes" if final["blade"] < final["rho1"] else "no"
        lines.append(f"- blade beats rho1 on final target validation loss: {beats} "
                     f"(blade − rho1 = {final['blade'] - final['rho1']:+.4f}).")
    for name, s in strategies.items():
        if s["tokens_trained"] >= s["tokens_seen"]:
            continue  # selects every token: its shares are the base rates
        below = [f"{_label_name(label)} ({_pct(s['shares'][label]['selected_rate'])} vs "
                 f"{_pct(s['shares'][label]['base_rate'])})" for label in _below_base(s["shares"])]
        lines.append(f"- Labels {name} selects below their base rate by more than 2 sampling errors: "
                     + ("; ".join(below) if below else "none") + ".")
    return lines


def _markdown(results: dict, meta: dict, images: list[str]) -> str:
    strategies = results["strategies"]
    lines = [f"# {meta.get('title', 'Token selection experiment')}", ""]
    if "command" in meta:
        lines += ["```", str(meta["command"]), "```", ""]
    lines += ["## Setup", ""] + [f"- {entry}" for entry in meta.get("setup", [])]
    if results.get("base_val_loss") is not None:
        lines.append("- base model target validation loss (step 0 of every curve): "
                     f"{results['base_val_loss']:.4f}")
    lines += ["", "## Table 1: target validation loss", ""] + _loss_table(strategies)
    if any(s["shares"] for s in strategies.values()):
        lines += ["", "## Table 2: share of selected tokens per label", "",
                  "Share of the selected tokens that carry the label, enrichment (share / base rate) in "
                  "parentheses; base rate = share of the seen tokens, ± twice the sampling error of a "
                  "uniform random selection of as many tokens (percentage points).", ""]
        lines += _share_table(strategies)
    if any(v["score"] is not None for s in strategies.values() for v in s["signals"].values()):
        lines += ["", "## Table 3: why — mean per-token losses by label when selecting", "",
                  "Mean proxy loss ℓ(u) over the seen tokens of the label, and for the strategies with a "
                  "reference the mean score s = ℓ(u) − ℓ(w) (so ℓ(w) = ℓ(u) − s): a label is kept when its "
                  "score is high relative to the rest of the batch, not when its loss is.", ""]
        lines += _signal_table(strategies)
    if any(s["source_rates"] for s in strategies.values()):
        lines += ["", "### Selection rate per source (selected / seen tokens of the source)", ""]
        lines += _source_table(strategies)
    if oracle_table(strategies):
        lines += ["", "## Table 4: against the exact one-step choice", ""] + oracle_table(strategies)
    lines += ["", "## Plots", ""]
    lines += [f"![{title}]({name})\n" for name, title, _ in PLOTS if name in images]
    lines += ["", "## Verdict", ""] + _verdict(strategies)
    return "\n".join(lines) + "\n"


def _colours(names: list[str]) -> dict:
    extra = iter(EXTRA_COLOURS * len(names))
    return {name: COLOURS.get(name) or next(extra) for name in names}


PLOTS = (("val_loss.png", "Target validation loss", plot_val_loss),
         ("selection_rates.png", "Selection rates per label", plot_selection_rates),
         ("score_hist.png", "Score distribution over training (paper Fig. 3)", plot_score_hists),
         ("dist_u_w.png", "Dist(u, w) over training (paper Fig. 4)", plot_dist_u_w),
         ("oracle.png", "Spearman with the exact first-order choice", plot_oracle_runs))


def write_report(out_dir: str, results: dict, meta: dict) -> str:
    """Write results.json (results and meta), report.md and the plots into out_dir; return the path
    of report.md."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, **results}, f, indent=1)
    strategies = results["strategies"]
    colours = _colours(list(strategies))
    images = []
    for name, _, plot in PLOTS:
        path = os.path.join(out_dir, name)
        if plot(strategies, colours, path):
            images.append(name)
        elif os.path.exists(path):
            os.remove(path)  # left by an earlier report of runs that had the data
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(_markdown(results, meta, images))
    return path
