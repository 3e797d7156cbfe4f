"""The summary of tools/gpu_check.sh: one markdown page from the bench.json files of its runs.

    python tools/gpu_summary.py WORK_DIR [--memory-gib 139.8] > summary.md

WORK_DIR holds one folder per `blade bench` run (RUN/bench.json), and optionally env.json (what
gpu_check.sh measured of the machine) and runs.txt (one line per run: its exit status, or why it was
skipped). For every run: its settings (read back from the config and overrides the bench recorded),
step times and MFU per strategy, BLADE / full against the analytic floor (issue 15), and the memory
measured against `blade plan`'s prediction for the same config (issue 13), with the largest micro-batch
the plan says fits in --memory-gib. The numbers are the bench's; this file only arranges them.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blade.config import load_config  # noqa: E402
from blade.model.plan import largest_micro_batch, plan  # noqa: E402

GIB = 2**30
TOP_ROWS = 12  # rows of each profile table shown


def size(x: float) -> str:
    """GiB on a GPU's scale, MiB below one GiB (the dry run's tiny model)."""
    return f"{x / GIB:.2f} GiB" if x >= GIB else f"{x / 2**20:.1f} MiB"


def load_runs(work: str) -> dict[str, dict]:
    runs = {}
    for path in sorted(glob.glob(os.path.join(work, "*", "bench.json"))):
        with open(path) as f:
            runs[os.path.basename(os.path.dirname(path))] = json.load(f)
    return runs


def run_config(result: dict, strategy: str):
    m = result["meta"]
    config = None if m["config"] == "(built-in defaults)" else m["config"]
    return load_config(config, list(m["overrides"]) + [f"selection.strategy={strategy}"])


def settings_table(runs: dict) -> list[str]:
    lines = ["| run | strategies | ZeRO | ranks | micro x seq | activation ckpt | compile | fused AdamW | "
             "precision |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        m = r["meta"]
        cfg = run_config(r, r["order"][0])
        lines.append(f"| {name} | {', '.join(r['order'])} | {m['zero_stage']} | {m['world_size']} | "
                     f"{m['micro_batch_size']} x {m['seq_len']} | {cfg.model.activation_checkpointing} | "
                     f"{cfg.train.compile} | {cfg.optim.fused} | {m['precision']} |")
    return lines


def throughput_table(runs: dict, matmul_peak: float | None) -> list[str]:
    extra = " | share of measured matmul" if matmul_peak else ""
    lines = [f"| run | strategy | step s median (p10-p90) | amortised s | tokens seen/s | achieved TFLOP/s per rank | "
             f"MFU{extra} |", "|---|---|---|---|---|---|---|" + ("---|" if matmul_peak else "")]
    for name, r in runs.items():
        for strategy, s in r["strategies"].items():
            st = s["step_s"]
            row = (f"| {name} | {strategy} | {st['median']:.3f} ({st['p10']:.3f}-{st['p90']:.3f}) | "
                   f"{s['amortised_step_s']:.3f} | {s['tokens_seen_per_s']:,.0f} | "
                   f"{s['achieved_flops_per_device'] / 1e12:.3g} | {100 * s['mfu']:.1f} % |")
            if matmul_peak:
                row += f" {100 * s['achieved_flops_per_device'] / matmul_peak:.1f} % |"
            lines.append(row)
    return lines


def ratio_table(runs: dict) -> list[str]:
    lines = ["| run | blade / full amortised | analytic floor | ratio / floor | <= 1.05 x floor |",
             "|---|---|---|---|---|"]
    for name, r in runs.items():
        s = r["strategies"]
        if "full" in s and "blade" in s:
            ratio = s["blade"]["amortised_step_s"] / s["full"]["amortised_step_s"]
            floor = r["analytic_floor"]
            lines.append(f"| {name} | {ratio:.3f} | {floor:.3f} | {ratio / floor:.3f} | "
                         f"{'PASS' if ratio <= 1.05 * floor else 'FAIL'} |")
    return lines if len(lines) > 2 else []


def memory_table(runs: dict, memory_gib: float | None) -> list[str]:
    """Measured state / step / peak per rank against plan() of the same config."""
    lines = ["| run | strategy | state bench / plan | step bench / plan | peak bench / plan | "
             "bench / plan | largest micro-batch (plan) |", "|---|---|---|---|---|---|---|"]
    ratios = []
    for name, r in runs.items():
        m = r["meta"]
        gpu = not m["machine"]["device_name"].startswith("CPU")
        peaks = {}
        for strategy, s in r["strategies"].items():
            cfg = run_config(r, strategy)
            p = plan(cfg, m["world_size"], m["seq_len"], gpu=gpu)
            mem = s["memory"]
            largest = (largest_micro_batch(cfg, m["world_size"], memory_gib * GIB, m["seq_len"], gpu)
                       if memory_gib else "-")
            peaks[strategy] = (mem["peak_bytes"], p.step_peak)
            lines.append(f"| {name} | {strategy} | {size(mem['state_bytes'])} / {size(p.state)} | "
                         f"{size(mem['step_bytes'])} / {size(p.transient)} | "
                         f"{size(mem['peak_bytes'])} / {size(p.step_peak)} | "
                         f"{mem['peak_bytes'] / p.step_peak:.2f} | {largest} |")
        if "full" in peaks and "blade" in peaks:
            ratios.append(f"- {name}: peak memory blade / full {peaks['blade'][0] / peaks['full'][0]:.2f} "
                          f"measured, {peaks['blade'][1] / peaks['full'][1]:.2f} planned")
    budget = f" in {memory_gib:.1f} GiB" if memory_gib else ""
    return lines + [""] + ratios + ["", f"Plan: `blade plan` of the run's config (blade/model/plan.py); its "
                                    f"peak here is a training step's (state + transient), the bench's "
                                    f"peak is state + step; largest micro-batch{budget} counts a "
                                    "reference phase too."]


def profile_tables(work: str) -> list[str]:
    """The last table of each STRATEGY_top_ops.txt (by self device time on a GPU), first rows."""
    lines = []
    for path in sorted(glob.glob(os.path.join(work, "*", "profile", "*_top_ops.txt"))):
        with open(path) as f:
            table = f.read().strip().split("\n\n")[-1].splitlines()
        run = os.path.basename(os.path.dirname(os.path.dirname(path)))
        lines += ["", f"`{run}/profile/{os.path.basename(path)}`:", "", "```"] + table[:TOP_ROWS + 3] + ["```"]
    return lines


def render(work: str, memory_gib: float | None) -> str:
    runs = load_runs(work)
    env = {}
    if os.path.isfile(os.path.join(work, "env.json")):
        with open(os.path.join(work, "env.json")) as f:
            env = json.load(f)
    first = next(iter(runs.values()), None)
    title = first["meta"]["machine"]["device_name"] if first else env.get("device", "no bench finished")
    lines = [f"# tools/gpu_check.sh on {title}", ""]
    if first:
        m = first["meta"]
        lines += [f"- {m['machine']['description']}; torch {m['machine']['torch']}, deepspeed "
                  f"{m['machine']['deepspeed']}, python {m['machine']['python']}; {m['date']}",
                  f"- {m['params']:,} parameters; {m['warmup']} warm-up and {m['steps']} timed steps per strategy; "
                  f"MFU against {m['peak_flops'] / 1e12:.3g} TFLOP/s per rank ({m['peak_how']})"]
    for key, value in env.items():
        lines.append(f"- {key}: {value}")
    status = os.path.join(work, "runs.txt")
    if os.path.isfile(status):
        with open(status) as f:
            lines += ["", "Runs:", ""] + [f"- {line.strip()}" for line in f if line.strip()]
    if not runs:
        return "\n".join(lines + ["", "No bench.json was written."]) + "\n"
    matmul = env.get("matmul_bf16_tflops")
    lines += ["", "## Settings", ""] + settings_table(runs)
    lines += ["", "## Throughput and MFU", ""] + throughput_table(runs, matmul * 1e12 if matmul else None)
    ratio = ratio_table(runs)
    if ratio:
        lines += ["", "## BLADE / full (amortised step) against the analytic floor", ""] + ratio
    lines += ["", "## Memory per rank: measured against `blade plan`", ""] + memory_table(runs, memory_gib)
    profile = profile_tables(work)
    if profile:
        lines += ["", "## Top operators (`--profile`)"] + profile
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", help="the folder with one RUN/bench.json per run")
    ap.add_argument("--memory-gib", type=float, help="memory per rank for the plan's largest micro-batch")
    args = ap.parse_args()
    sys.stdout.write(render(args.work, args.memory_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
