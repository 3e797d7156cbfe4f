"""How close is each strategy's selection to the exact one-step bi-level choice? (docs/experiments/exact-oracle.md)

    .venv/bin/python tools/oracle_study.py [--out runs/oracle] [--doc docs/experiments/exact-oracle]
                                           [--only NAME ...] [--steps 100] [--interval 5]

Trains the quickstart model (configs/quickstart.yaml, 0.63M parameters, the built-in corpus) once per
setting below on one rank (global batch 16 x 128 as in the quickstart's 2 x 8) with the exact oracle
measuring every --interval selecting steps (selection.exact_interval), then writes the table and plots
of blade/experiment/oracle_report.py into --doc. A finished run (its metrics.jsonl has a summary) is
reused; delete its directory to redo it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = {  # name -> overrides of configs/quickstart.yaml (tau 40, K 20, lambda 1, K0 50, 20 warm-up steps)
    "blade": [],
    "blade K=5": ["selection.k_ref_steps=5"],
    "blade lam=0": ["selection.lam=0"],
    "rho1": ["selection.strategy=rho1"],
    "random": ["selection.strategy=random"],
}


def _finished(run_dir: str) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return any(json.loads(line)["kind"] == "summary" for line in f if line.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/oracle")
    ap.add_argument("--doc", default="docs/experiments/exact-oracle")
    ap.add_argument("--only", nargs="*", help="run only these settings (the report reads every finished one)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--interval", type=int, default=5)
    args = ap.parse_args()
    data = os.path.join(ROOT, "data", "builtin")
    py = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(os.path.join(data, "train", "manifest.json")):
        subprocess.run([py, "-m", "blade", "prepare", "--builtin", data], check=True)
    runs = {}
    for name, overrides in SETTINGS.items():
        run_dir = os.path.join(args.out, name.replace(" ", "_").replace("=", ""))
        if (args.only is None or name in args.only) and not _finished(run_dir):
            cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), "1", "-c",
                   os.path.join(ROOT, "configs", "quickstart.yaml"), f"run.dir={run_dir}",
                   f"data.train={data}/train", f"data.target={data}/target", f"data.val={data}/val",
                   f"train.steps={args.steps}", "train.micro_batch_size=16", "logging.wandb=off",
                   "logging.progress=false", f"selection.exact_interval={args.interval}", *overrides]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHON": py})
        if _finished(run_dir):
            runs[name] = run_dir
    from blade.experiment.oracle_report import write_oracle_report

    print(write_oracle_report(runs, args.doc, command=" ".join(["tools/oracle_study.py", *sys.argv[1:]])))


if __name__ == "__main__":
    main()
