"""`blade inspect RUN_DIR`: PNG plots of what a run selected and an HTML page with highlighted tokens.

Plots: losses, score histograms over time (paper Fig. 3), Dist(u, w) over time (Fig. 4), per-source
and per-label selection rates, and the comparison with the exact one-step choice (`oracle` records). The page shows sample sequences with each token coloured by whether it
was selected, its noise label underlined.
"""
from __future__ import annotations

import html
import json
import os

from blade.errors import BladeError
from blade.runtime.metrics import read_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict], path: str) -> None:
    plt = _plt()
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["tokens_seen"] for r in train], [r["loss_all_tokens"] for r in train], label="train (all tokens)")
    ax.plot([r["tokens_seen"] for r in train], [r["loss"] for r in train], label="train (selected)", alpha=0.7)
    if evals:
        ax.plot([r["tokens_seen"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_score_histograms(diags: list[dict], path: str) -> bool:
    hists = [d for d in diags if "score_hist" in d]
    if not hists:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    cmap = plt.get_cmap("viridis")
    for i, d in enumerate(hists):
        edges, counts = d["score_hist"]["edges"], d["score_hist"]["counts"]
        total = max(1, sum(counts))
        centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        ax.plot(centres, [c / total for c in counts], color=cmap(i / max(1, len(hists) - 1)),
                label=f"step {d['step']}")
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("score = proxy loss - reference loss")
    ax.set_ylabel("fraction of tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_distance(records: list[dict], path: str) -> bool:
    pts = [(r["step"], r["dist_u_w"]) for r in records if r["kind"] == "train" and "dist_u_w" in r]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(*zip(*pts), "o-")
    ax.set_xlabel("step")
    ax.set_ylabel("Dist(u, w) = |u - w| / |u|")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def oracle_names(rows: list[dict], prefix: str) -> list[str]:
    """The strategies (rankings or sets) measured under `prefix` (spearman_, fo_gain_, dl_) in oracle records."""
    return list(dict.fromkeys(k[len(prefix):] for r in rows for k in r if k.startswith(prefix)))


def plot_oracle(records: list[dict], path: str) -> bool:
    """Against the exact one-step choice (blade/train/oracle.py), over steps: Spearman of each ranking
    with the first-order scores, each set's first-order gain (random 0, oracle 1), and the realised
    change of the target loss of each set's AdamW step minus random's. Dotted lines: reference phases."""
    rows = [r for r in records if r["kind"] == "oracle"]
    if not rows:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    steps = [r["step"] for r in rows]
    panels = (("spearman_", "Spearman with g_i . g_T", lambda r, n: r.get(f"spearman_{n}")),
              ("fo_gain_", "first-order gain (random 0, oracle 1)", lambda r, n: r.get(f"fo_gain_{n}")),
              ("dl_", "dL_target - dL_target(random)", lambda r, n: r[f"dl_{n}"] - r["dl_random"]))
    for ax, (prefix, label, value) in zip(axes, panels):
        for name in oracle_names(rows, prefix):
            if prefix == "dl_" and name == "random":
                continue
            ax.plot(steps, [value(r, name) for r in rows], "o-", ms=3, label=name)
        for r in records:
            if r["kind"] == "ref":
                ax.axvline(r["step"], color="grey", ls=":", lw=0.8)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_rates(summary: dict, path: str) -> bool:
    groups = [(key, summary.get(key) or {}) for key in ("by_source", "by_label")]
    groups = [(k, {n: v for n, v in g.items() if v.get("total")}) for k, g in groups]
    if not any(g for _, g in groups):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    kept = summary.get("tokens_trained", 0) / max(1, summary.get("tokens_seen", 1))
    for ax, (key, g) in zip(axes, groups):
        names = list(g)
        ax.bar(names, [g[n]["rate"] for n in names])
        ax.axhline(kept, color="red", ls="--", lw=1, label=f"overall kept {kept:.2f}")
        ax.set_title(f"selected rate {key.replace('_', ' ')}")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _tokenizer_for(run_dir: str):
    from blade.config import load_config
    from blade.data.tokenizer import Tokenizer

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    train = cfg.data.dirs("train")[0]
    for folder in (train, os.path.dirname(os.path.normpath(train))):
        path = os.path.join(folder, "tokenizer.model")
        if os.path.exists(path):
            return Tokenizer(path)
    return None


def sample_html(samples: list[dict], tokenizer) -> str:
    parts = []
    for s in samples:
        spans = []
        for tok, sel, lab, sc in zip(s["targets"], s["selected"], s["labels"], s["score"]):
            if tok < 0:
                continue
            piece = tokenizer.sp.id_to_piece(tok).replace("\u2581", " ") if tokenizer else f"[{tok}]"
            cls = ("sel" if sel else "drop") + (" noisy" if lab else "")
            spans.append(f'<span class="{cls}" title="score {sc}">{html.escape(piece)}</span>')
        parts.append(f"<h3>step {s['step']}</h3><p class=sample>{''.join(spans)}</p>")
    return "\n".join(parts)


def inspect_run(run_dir: str, out: str | None = None) -> str:
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        raise BladeError(f"inspect: no metrics.jsonl in '{run_dir}' (is it a blade run directory?)")
    out = out or os.path.join(run_dir, "inspect")
    os.makedirs(out, exist_ok=True)
    records = read_metrics(run_dir)
    diags = [r for r in records if r["kind"] == "diag"]
    summary = next((r for r in reversed(records) if r["kind"] == "summary"), diags[-1] if diags else {})
    figures = []
    plot_losses(records, os.path.join(out, "losses.png"))
    figures.append("losses.png")
    for name, made in (("score_hist.png", plot_score_histograms(diags, os.path.join(out, "score_hist.png"))),
                       ("dist_u_w.png", plot_distance(records, os.path.join(out, "dist_u_w.png"))),
                       ("oracle.png", plot_oracle(records, os.path.join(out, "oracle.png"))),
                       ("selection_rates.png", plot_rates(summary, os.path.join(out, "selection_rates.png")))):
        if made:
            figures.append(name)
    samples = []
    sample_file = os.path.join(run_dir, "samples.jsonl")
    if os.path.exists(sample_file):
        with open(sample_file) as f:
            samples = [json.loads(line) for line in f if line.strip()][-4:]
    body = "".join(f'<img src="{f}">' for f in figures)
    page = f"""<!doctype html><meta charset="utf-8"><title>blade inspect: {html.escape(run_dir)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} img{{max-width:49%}}
.sample{{font-family:monospace;white-space:pre-wrap;line-height:1.6}} .sel{{background:#b7f0b1}}
.drop{{color:#999}} .noisy{{text-decoration:underline red}}</style>
<h1>{html.escape(run_dir)}</h1>{body}
<h2>Samples</h2><p>green = selected for training, grey = dropped, red underline = labelled noise</p>
{sample_html(samples, _tokenizer_for(run_dir) if samples else None)}"""
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(page)
    return out
