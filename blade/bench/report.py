"""The report of `blade bench` (blade/bench/run.py): what one rank measured for one strategy
(`StrategyRun`), the aggregation over ranks into per-strategy numbers, the issue's targets, and the
outputs (bench.json, report.md, breakdown.png). Arithmetic on what the run measured; nothing here
measures.

Definitions (all written into the report):

* step time: wall time of `Trainer.train_step`, the slowest rank; median, p10, p90 over timed steps.
* amortised step = median step + reference phase / tau (blade; rho1's phase happens once per run
  and is reported, not amortised); "all-in" adds checkpoint saves per step x save time.
* tokens seen per step = valid target tokens of the global batch = micro x accum x ranks x seq_len
  when nothing is padded; tokens trained = the selected ones. Per second = per step / amortised step.
* model FLOPs per step: `flops.step_flops` (2 FLOPs per multiply-add, backward = 2 x forward, causal
  attention counts t + 1 keys at position t, no recomputation); achieved FLOP/s per device = FLOPs /
  amortised step / ranks; MFU = that / the device peak.
* memory, per rank (the largest rank is reported; a rank's step memory is the median over its measured
  steps): `state` = the bytes of the distinct tensors the strategy's engines hold between steps (weight
  partitions, fp32 masters, AdamW moments, gradient buffers; `bench_probes.held_tensor_bytes`); `step` =
  the peak during a step above the memory at its start (activations, gathered parameters, logits
  chunks); `peak` = state + step, what a process running only that strategy holds above the common
  baseline (interpreter, libraries). The step peak on CUDA: max_memory_allocated minus memory_allocated
  at the step's start, in the timed steps; on the CPU: the resident set size (VmHWM, reset before each
  step via /proc/self/clear_refs, minus the RSS at the start) in extra untimed steps after the timing
  (`--memory-steps`), with the C allocator told to return freed memory at once (glibc: every allocation
  over 64 KiB by mmap and a trimmed heap; tcmalloc: aggressive decommit; blade/runtime/malloc.py), so
  that freed tensors leave the RSS (that mode makes every fresh activation page-fault: it doubled the
  100M model's step time under glibc, so it never runs during the timed steps).
* breakdown: mean seconds per step of each phase timed inside the step (blade/runtime/timing.py), `rank_wait`
  = a barrier in front of the selection (the time this rank waits for slower ranks, which the first
  top-k all-reduce would absorb otherwise), `other` = the rest (count all-reduces, diagnostics, loss
  bookkeeping), plus the amortised reference phase and checkpoint. Means, so that the bars add up to the
  mean step.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field

from blade.model import flops
from blade.runtime.timing import REF_PHASES, STEP_PHASES

PHASES = STEP_PHASES + ("rank_wait", "other")
TARGETS = {"ratio_slack": 1.05, "selection_share": 0.01, "sync_share": 0.5, "loader_factor": 10.0,
           "memory_ratio": 1.10, "anchor": 1.10, "anchor_zero3": 1.25}  # anchor: full / plain DDP step


# ============================================================================ arithmetic (pure)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values) if values else math.nan, "p10": percentile(values, 10),
            "p90": percentile(values, 90), "mean": statistics.fmean(values) if values else math.nan,
            "n": len(values)}


def global_tokens_per_step(micro: int, accum: int, world: int, seq_len: int) -> int:
    """Token positions of one optimizer step over all ranks and accumulation micro-batches."""
    return micro * accum * world * seq_len


def checkpoints_per_step(strategy: str, interval: int, tau: int) -> float:
    """Saves per step in a long run: every `interval` steps, and at every blade sync."""
    rate = 1.0 / interval if interval else 0.0
    if strategy == "blade":
        rate += 1.0 / tau
        if interval:
            rate -= 1.0 / math.lcm(interval, tau)  # a step that is both saves once
    return rate


def mfu(flops_per_step: float, step_s: float, world: int, peak_per_device: float) -> tuple[float, float]:
    """(achieved FLOP/s per device, model FLOPs utilisation); flops_per_step counts all ranks."""
    achieved = flops_per_step / step_s / world
    return achieved, achieved / peak_per_device


@dataclass
class StrategyRun:
    """What one rank measured for one strategy (raw, before aggregation)."""
    name: str
    step_s: list[float] = field(default_factory=list)          # wall time of each timed step
    phases: list[dict] = field(default_factory=list)           # time_<phase>_s of each timed step
    n_valid: list[int] = field(default_factory=list)
    n_selected: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    step_peak_bytes: list[int] = field(default_factory=list)   # peak above the step's start
    process_peak_bytes: int = 0
    state_bytes: int = 0              # tensors the strategy's engines hold (held_tensor_bytes)
    state_allocated_bytes: int = 0    # the same tensors' allocated size (CPU: address space too)
    state_growth_bytes: int = 0       # RSS / allocated growth over its build and first step
    first_phase_s: float | None = None                         # blade: first sync; rho1: one-time
    ref_phase_s: float | None = None                           # a real (scored) blade phase
    ref_phase_parts: dict = field(default_factory=dict)
    sync_collectives: dict | None = None
    checkpoint_s: float | None = None
    checkpoint_error: str | None = None


def summarize_strategy(name: str, ranks: list[StrategyRun], cfg, world: int, seq_len: int,
                       peak: float) -> dict:
    """Aggregate the ranks' raw numbers of one strategy: the slowest rank's step time, the mean of the
    ranks' phases, the largest rank's memory."""
    n = min(len(r.step_s) for r in ranks)
    step_s = [max(r.step_s[i] for r in ranks) for i in range(n)]
    st = spread(step_s)
    phase_mean = {}
    for p in STEP_PHASES + ("rank_wait",):
        phase_mean[p] = statistics.fmean(statistics.fmean(r.phases[i].get(f"time_{p}_s", 0.0) for r in ranks)
                                         for i in range(n)) if n else 0.0
    phase_mean["other"] = max(0.0, st["mean"] - sum(phase_mean.values()))
    r0 = ranks[0]
    seen = statistics.median(r0.n_valid) if r0.n_valid else 0
    trained = statistics.median(r0.n_selected) if r0.n_selected else 0
    sel, ck = cfg.selection, cfg.checkpoint
    phase_s = max((r.ref_phase_s or 0.0) for r in ranks) if name == "blade" else 0.0
    ref_amortised = phase_s / sel.tau if name == "blade" else 0.0
    amortised = st["median"] + ref_amortised
    ckpt_s = max((r.checkpoint_s or 0.0) for r in ranks)
    ckpt_rate = checkpoints_per_step(name, ck.interval, sel.tau)
    all_in = amortised + ckpt_rate * ckpt_s
    f = flops.step_flops(cfg, world, seq_len, name)
    achieved, util = mfu(f.total, amortised, world, peak)
    parts = {k: max(r.ref_phase_parts.get(k, 0.0) for r in ranks) for k in REF_PHASES} if name == "blade" else {}
    return {
        "step_s": st,
        "amortised_step_s": amortised,
        "all_in_step_s": all_in,
        "tokens_seen_per_step": seen,
        "tokens_trained_per_step": trained,
        "kept_fraction": trained / seen if seen else math.nan,
        "tokens_seen_per_s": seen / amortised,
        "tokens_trained_per_s": trained / amortised,
        "tokens_seen_per_s_steady": seen / st["median"],
        "tokens_trained_per_s_steady": trained / st["median"],
        "tokens_seen_per_s_all_in": seen / all_in,
        "flops": {"proxy_train": f.proxy_train, "proxy_rescore": f.proxy_rescore,
                  "reference_forward": f.reference_forward, "reference_phase": f.reference_phase,
                  "total": f.total},
        "achieved_flops_per_device": achieved,
        "mfu": util,
        "breakdown_s": {**phase_mean, "reference_phase": ref_amortised,
                        "checkpoint": ckpt_rate * ckpt_s},
        "topk_rounds_max": max((x for r in ranks for x in r.rounds), default=0),
        "memory": {"state_bytes": max(r.state_bytes for r in ranks),
                   "step_bytes": max(_step_peak(r) for r in ranks),
                   "peak_bytes": max(r.state_bytes + _step_peak(r) for r in ranks),
                   "process_peak_bytes": max(r.process_peak_bytes for r in ranks),
                   "state_growth_bytes": max(r.state_growth_bytes for r in ranks),
                   "state_allocated_bytes": max(r.state_allocated_bytes for r in ranks),
                   "per_rank_peak_bytes": [r.state_bytes + _step_peak(r) for r in ranks],
                   "per_rank_step_bytes": [list(r.step_peak_bytes) for r in ranks]},
        "reference_phase": None if name != "blade" else {
            "k": sel.k_ref_steps, "tau": sel.tau, "phase_s": phase_s, "amortised_s": ref_amortised,
            **{f"{k}_s": v for k, v in parts.items()},
            "first_sync_phase_s": max((r.first_phase_s or 0.0) for r in ranks),
            "sync_collectives": r0.sync_collectives},
        "one_time_reference_s": max((r.first_phase_s or 0.0) for r in ranks) if name == "rho1" else None,
        "checkpoint": {"save_s": ckpt_s, "saves_per_step": ckpt_rate,
                       "error": next((r.checkpoint_error for r in ranks if r.checkpoint_error), None)},
    }


def _step_peak(run: StrategyRun) -> int:
    """A rank's step working memory: the median of its per-step peaks (the CPU's RSS peaks scatter by
    +-5 MB on the tiny model from allocator and communication-thread noise; a median ignores that)."""
    return int(statistics.median(run.step_peak_bytes)) if run.step_peak_bytes else 0


def analytic_floor(cfg, world: int, seq_len: int) -> float:
    """BLADE / full step time if time were proportional to model FLOPs: 1 + reference-forward share +
    (proxy re-forward under accumulation) + amortised reference phase."""
    return flops.step_flops(cfg, world, seq_len, "blade").total / flops.step_flops(cfg, world, seq_len, "full").total


def check_targets(result: dict) -> list[dict]:
    """The issue's targets, each with the measured value, pass/fail and (if failed) why, in numbers."""
    s = result["strategies"]
    out = []
    full, blade = s.get("full"), s.get("blade")
    if full and blade:
        floor = result["analytic_floor"]
        ratio = blade["amortised_step_s"] / full["amortised_step_s"]
        fs, bs = full["step_s"]["median"], blade
        fl_full = full["flops"]["total"]
        expect = {k: fs * blade["flops"][k] / fl_full for k in ("reference_forward", "reference_phase")}
        got = {"reference_forward": bs["breakdown_s"]["reference_forward"] + bs["breakdown_s"]["selection"],
               "reference_phase": bs["breakdown_s"]["reference_phase"]}
        proxy_got = bs["step_s"]["median"] - got["reference_forward"]
        why = (f"per step, the reference forward + selection take {got['reference_forward']:.4f} s where "
               f"FLOPs predict {expect['reference_forward']:.4f} s, the amortised reference phase "
               f"{got['reference_phase']:.4f} s vs {expect['reference_phase']:.4f} s, and the proxy part of "
               f"the step {proxy_got:.4f} s vs full's {fs:.4f} s")
        out.append({"target": "blade / full step time <= 1.05 x analytic floor",
                    "measured": f"{ratio:.3f} (floor {floor:.3f}, limit {TARGETS['ratio_slack'] * floor:.3f})",
                    "value": ratio, "limit": TARGETS["ratio_slack"] * floor,
                    "passed": ratio <= TARGETS["ratio_slack"] * floor, "detail": why})
    for name in ("blade", "rho1", "random"):
        if name not in s:
            continue
        st = s[name]
        share = st["breakdown_s"]["selection"] / st["step_s"]["mean"]
        bound = result["max_rounds"]
        out.append({"target": f"{name}: selection < 1 % of the step, rounds <= {bound}",
                    "measured": f"{100 * share:.2f} % ({1e3 * st['breakdown_s']['selection']:.2f} ms of "
                                f"{1e3 * st['step_s']['mean']:.1f} ms), max rounds {st['topk_rounds_max']}",
                    "value": share, "limit": TARGETS["selection_share"],
                    "passed": share < TARGETS["selection_share"] and st["topk_rounds_max"] <= bound,
                    "detail": "each round is one all-reduce of at most 256 int64 counts; on a small step "
                              "the fixed latency of those rounds is what the share measures"})
        if name == "blade":
            break  # the target is BLADE's; rho1 and random are shown for comparison only
    if blade and blade["reference_phase"]:
        ref = blade["reference_phase"]
        col = ref["sync_collectives"] or {}
        base = (full or blade)["step_s"]["median"]
        share = ref["sync_s"] / base
        out.append({"target": "reference sync: zero collective bytes, < half a step",
                    "measured": f"{col.get('ops', '?')} collective ops, {col.get('bytes', '?')} bytes; "
                                f"{1e3 * ref['sync_s']:.2f} ms = {share:.3f} of a {'full' if full else 'blade'} step",
                    "value": share, "limit": TARGETS["sync_share"],
                    "passed": col.get("bytes") == 0 and col.get("ops") == 0 and share < TARGETS["sync_share"],
                    "detail": "local copy of this rank's weight and fp32-master partitions, moments zeroed"})
    anchor = result.get("anchor")
    if full and anchor:
        limit = TARGETS["anchor_zero3" if result["meta"]["zero_stage"] == 3 else "anchor"]
        fm, am = full["step_s"]["median"], anchor["step_s"]["median"]
        out.append({"target": f"full CE step <= {limit} x the plain torch DDP step (ZeRO-{result['meta']['zero_stage']})",
                    "measured": f"{fm / am:.3f} ({fm:.4f} s vs {am:.4f} s, medians of interleaved steps)",
                    "value": fm / am, "limit": limit, "passed": fm / am <= limit,
                    "detail": "the same model, batch, precision and optimizer; what differs is DeepSpeed's "
                              "work around it (see the step breakdown and --profile)"})
    loader = result["loader"]["tokens_per_s"]
    fastest = max(v["tokens_seen_per_s_steady"] for v in s.values())
    out.append({"target": "data loader >= 10 x training tokens/s",
                "measured": f"{loader:,.0f} tok/s loader vs {fastest:,.0f} tok/s training "
                            f"({loader / fastest:.1f} x)",
                "value": loader / fastest, "limit": TARGETS["loader_factor"],
                "passed": loader >= TARGETS["loader_factor"] * fastest,
                "detail": "loader timed alone on every rank at once (its own share of the cores)"})
    if full and blade:
        mb, mf = blade["memory"]["peak_bytes"], full["memory"]["peak_bytes"]
        sb, sf = blade["memory"]["step_bytes"], full["memory"]["step_bytes"]
        out.append({"target": f"peak memory blade <= {TARGETS['memory_ratio']} x full (same micro-batch)",
                    "measured": f"{mb / 2**20:.1f} MiB vs {mf / 2**20:.1f} MiB ({mb / max(mf, 1):.2f} x); "
                                f"step working memory alone {sb / 2**20:.1f} vs {sf / 2**20:.1f} MiB "
                                f"({sb / max(sf, 1):.2f} x)",
                    "value": mb / max(mf, 1), "limit": TARGETS["memory_ratio"],
                    "passed": mb <= TARGETS["memory_ratio"] * mf,
                    "detail": f"state {blade['memory']['state_bytes'] / 2**20:.1f} MiB vs "
                              f"{full['memory']['state_bytes'] / 2**20:.1f} MiB: the reference keeps its own "
                              "partitions, fp32 master and AdamW moments between syncs"})
    return out


# ============================================================================ report


def _mib(x) -> str:
    return f"{x / 2**20:,.1f}"


def render_markdown(result: dict) -> str:
    m, s = result["meta"], result["strategies"]
    lines = [f"# blade bench: {m['config']} on {m['machine']['device_name']}", "",
             f"- command: `{m['command']}`",
             f"- date: {m['date']}; blade git {m['git']}; torch {m['machine']['torch']}, deepspeed "
             f"{m['machine']['deepspeed']}, python {m['machine']['python']}",
             f"- machine: {m['machine']['description']}",
             f"- load average before / after: {m['loadavg_before']} / {m['loadavg_after']}",
             f"- layout: {m['world_size']} ranks x {m['threads_per_rank']} threads, ZeRO-{m['zero_stage']}, "
             f"{m['precision']} (reference {m['ref_precision']}), micro-batch {m['micro_batch_size']} x "
             f"accumulation {m['grad_accum']} x seq {m['seq_len']} = {m['tokens_per_step']:,} tokens per "
             f"step; model {m['params']:,} parameters",
             f"- {m['warmup']} warm-up and {m['steps']} timed steps per strategy, interleaved "
             f"({', '.join(result['order'])}, rotated every round); bench forces "
             "selection.warmup_full_ce_steps=0, no evaluation, no periodic checkpoints inside the timing",
             f"- device peak per rank: {m['peak_flops'] / 1e9:,.1f} GFLOP/s ({m['peak_how']})", ""]
    lines += ["## Throughput", "",
              "| strategy | step s median (p10-p90) | amortised step s | tokens seen/s | tokens trained/s |"
              " model GFLOP/step | achieved GFLOP/s per rank | MFU | peak MiB per rank (state + step) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, v in s.items():
        st, mem = v["step_s"], v["memory"]
        lines.append(f"| {name} | {st['median']:.4f} ({st['p10']:.4f}-{st['p90']:.4f}) | "
                     f"{v['amortised_step_s']:.4f} | {v['tokens_seen_per_s']:,.0f} | "
                     f"{v['tokens_trained_per_s']:,.0f} | {v['flops']['total'] / 1e9:,.2f} | "
                     f"{v['achieved_flops_per_device'] / 1e9:,.2f} | {100 * v['mfu']:.1f} % | "
                     f"{_mib(mem['peak_bytes'])} ({_mib(mem['state_bytes'])} + {_mib(mem['step_bytes'])}) |")
    if result.get("anchor"):
        a = result["anchor"]["step_s"]
        lines += ["", f"Peer anchor (`--anchor`): {result['anchor']['name']}, interleaved with the strategies: "
                  f"{a['median']:.4f} s per step ({a['p10']:.4f}-{a['p90']:.4f})."]
    lines += ["", "Tokens/s and MFU use the amortised step (median step + reference phase / tau). Steady "
              "(median step only) and all-in (plus checkpoint saves) rates are in bench.json.", "",
              "## Step breakdown (mean seconds per step)", "",
              "| strategy | " + " | ".join(PHASES) + " | reference phase / tau | checkpoint / interval | total |",
              "|---|" + "---|" * (len(PHASES) + 3)]
    for name, v in s.items():
        b = v["breakdown_s"]
        total = sum(b.values())
        lines.append(f"| {name} | " + " | ".join(f"{b[p]:.4f}" for p in PHASES) +
                     f" | {b['reference_phase']:.4f} | {b['checkpoint']:.4f} | {total:.4f} |")
    ref = s.get("blade", {}).get("reference_phase")
    if ref:
        col = ref["sync_collectives"] or {}
        lines += ["", "## Reference phase (blade)", "",
                  f"K = {ref['k']} reference steps every tau = {ref['tau']} steps. One real phase: "
                  f"{ref['phase_s']:.3f} s = scoring {ref['ref_score_s']:.3f} s + sync {1e3 * ref['sync_s']:.2f} ms "
                  f"+ reference steps {ref['ref_train_s']:.3f} s (+ loading); amortised {ref['amortised_s']:.4f} s "
                  f"per step. The first sync (nothing to score yet) took {ref['first_sync_phase_s']:.3f} s. "
                  f"Collectives during a sync: {col.get('ops', '?')} ops, {col.get('bytes', '?')} bytes."]
    if "rho1" in s and s["rho1"]["one_time_reference_s"]:
        lines += ["", f"rho1 trains its static reference once: {s['rho1']['one_time_reference_s']:.3f} s "
                  "(not amortised: once per run)."]
    lines += ["", f"## Targets (analytic floor blade/full = {result.get('analytic_floor', math.nan):.3f})", ""]
    for t in result["targets"]:
        mark = "PASS" if t["passed"] else "FAIL"
        lines.append(f"- [{'x' if t['passed'] else ' '}] **{mark}** {t['target']}: {t['measured']}"
                     + ("" if t["passed"] else f". Why: {t['detail']}"))
    from blade.bench.profile import render_profile

    lines += render_profile(result.get("profile") or {})
    lo = result["loader"]
    lines += ["", f"Data loader alone: {lo['tokens_per_s']:,.0f} tokens/s over {m['world_size']} ranks "
              f"({lo['steps']} steps per rank, num_workers={lo['num_workers']}).", "",
              "Memory: " + m["memory_note"], ""]
    return "\n".join(lines)


def plot_breakdown(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["strategies"])
    parts = list(PHASES) + ["reference_phase", "checkpoint"]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 4, 4.5))
    bottom = [0.0] * len(names)
    colors = plt.get_cmap("tab10").colors
    for i, p in enumerate(parts):
        vals = [1e3 * result["strategies"][n]["breakdown_s"][p] for n in names]
        ax.bar(names, vals, bottom=bottom, label=p, color=colors[i % len(colors)])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per step (mean)")
    ax.set_xlabel("reference phase and checkpoint amortised per step")
    m = result["meta"]
    ax.set_title(f"{os.path.basename(m['config'])}: {m['world_size']} ranks, {m['precision']}, "
                 f"ZeRO-{m['zero_stage']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out: str) -> dict:
    """bench.json, report.md and breakdown.png in `out`; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "bench.json"), "report": os.path.join(out, "report.md"),
             "chart": os.path.join(out, "breakdown.png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["report"], "w") as f:
        f.write(render_markdown(result))
    plot_breakdown(result, paths["chart"])
    return paths
