"""Measure the selection core: global top-k time and rounds at 2 and 4 ranks, reference sync time, and
the BLADE / full step-time ratio of the default config in fp32 and bf16.

    .venv/bin/python tools/measure_selection.py [--steps 80] [--out runs/measure]

Everything is measured on this machine by real runs (torchrun + launch/local.sh); the script prints a
markdown report and writes it with the raw numbers to OUT/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS_PER_RANK = (1024, 10_000, 100_000, 1_000_000)


def topk_worker(repeats: int) -> None:
    """Runs on every rank (under torchrun): time select_by_score on random scores."""
    import torch
    import torch.distributed as dist

    from blade.selection import select_by_score

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    rows = []
    for n in TOKENS_PER_RANK:
        g = torch.Generator().manual_seed(rank)
        scores, valid = torch.randn(1, n, generator=g), torch.ones(1, n, dtype=torch.bool)
        times, rounds = [], 0
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            _, stats = select_by_score(scores, valid, 0.6)
            times.append(time.perf_counter() - t0)
            rounds = stats.rounds
        rows.append({"world": world, "tokens_per_rank": n, "median_ms": 1e3 * statistics.median(times),
                     "min_ms": 1e3 * min(times), "rounds": rounds})
    if rank == 0:
        print("TOPK " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_topk(world: int, repeats: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                          f"--master_port={free_port()}",
                          os.path.abspath(__file__), "--worker", str(repeats)],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith("TOPK "))
    return json.loads(line[5:])


def train_run(out: str, strategy: str, precision: str, steps: int) -> dict:
    run_dir = os.path.join(out, f"{strategy}_{precision}")
    subprocess.run(["bash", "launch/local.sh", "2", "-c", "configs/quickstart.yaml", f"run.dir={run_dir}",
                    f"selection.strategy={strategy}", f"train.precision={precision}", f"train.steps={steps}",
                    "logging.wandb=off", "logging.progress=false", "train.eval_interval=0"],
                   check=True, cwd=ROOT, capture_output=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    warm = 20  # the quickstart's full-CE warm-up; also skips the first, slower steps
    train = [r for r in records if r["kind"] == "train"][warm:]
    refs = [r for r in records if r["kind"] == "ref"]
    return {
        "median_step_s": statistics.median(r["step_time_s"] for r in train),
        "median_ref_forward_s": statistics.median(r["ref_forward_time_s"] for r in train),
        "median_selection_s": statistics.median(r["selection_time_s"] for r in train),
        "rounds": max((r.get("topk_rounds", 0) for r in train), default=0),
        "ref_phase_s": sum(r["ref_phase_time_s"] for r in refs),
        "sync_s": [r["sync_time_s"] for r in refs],
        "steps_measured": len(train),
        "amortised_step_s": (sum(r["step_time_s"] for r in train) +
                             sum(r["ref_phase_time_s"] for r in refs if r["step"] >= warm)) / len(train),
    }


def report(topk: list[dict], runs: dict) -> str:
    lines = ["## Global top-k (random fp32 scores, gamma 0.6, gloo, 1 thread per rank)", "",
             "| ranks | tokens per rank | median ms | min ms | all-reduce rounds |", "|---|---|---|---|---|"]
    lines += [f"| {r['world']} | {r['tokens_per_rank']:,} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
              f"{r['rounds']} |" for r in topk]
    lines += ["", "## Default config (configs/quickstart.yaml, 2 ranks, ZeRO-3)", "",
              "| precision | full step s | blade step s | ratio (steady) | ratio (with reference phases) |"
              " blade selection ms | reference forward ms | sync ms |", "|---|---|---|---|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        full, blade = runs[f"full_{precision}"], runs[f"blade_{precision}"]
        lines.append(
            f"| {precision} | {full['median_step_s']:.3f} | {blade['median_step_s']:.3f} | "
            f"{blade['median_step_s'] / full['median_step_s']:.2f} | "
            f"{blade['amortised_step_s'] / full['amortised_step_s']:.2f} | "
            f"{1e3 * blade['median_selection_s']:.2f} | {1e3 * blade['median_ref_forward_s']:.1f} | "
            f"{', '.join(f'{1e3 * s:.2f}' for s in blade['sync_s'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default="runs/measure")
    args = p.parse_args()
    if args.worker:
        return topk_worker(args.worker)
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(os.path.join(ROOT, "data/builtin/train/manifest.json")):
        subprocess.run([sys.executable, "-m", "blade", "prepare", "--builtin", "data/builtin"], check=True, cwd=ROOT)
    topk = [row for world in (2, 4) for row in measure_topk(world, args.repeats)]
    runs = {f"{s}_{p}": train_run(args.out, s, p, args.steps) for p in ("fp32", "bf16") for s in ("full", "blade")}
    text = report(topk, runs)
    print(text)
    with open(os.path.join(args.out, "selection_report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "selection_raw.json"), "w") as f:
        json.dump({"topk": topk, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
