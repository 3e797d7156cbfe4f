"""Summarise the runs of run.sh / variants.sh: per variant, the median over rounds of each round's
median full step and blade amortised step (`blade bench`), and of the DDP anchor's median step.

    .venv/bin/python docs/benchmarks/cpu-2core_2026-12-02b/summarize.py runs/bench15 [--json out.json]
"""
import argparse
import glob
import json
import os
import re
import statistics


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--json")
    a = p.parse_args()
    rows = {}
    for path in sorted(glob.glob(os.path.join(a.out, "*_r*"))):
        m = re.match(r"(.+)_r(\d+)(\.json)?$", os.path.basename(path))
        if not m or path.endswith(".log"):
            continue
        name, rnd = m.group(1), int(m.group(2))
        if os.path.isdir(path):
            if not os.path.exists(os.path.join(path, "bench.json")):
                continue
            b = json.load(open(os.path.join(path, "bench.json")))
            s = b["strategies"]
            rows.setdefault(name, []).append({
                "round": rnd, "full_s": s["full"]["step_s"]["median"],
                "blade_s": s["blade"]["step_s"]["median"], "blade_amortised_s": s["blade"]["amortised_step_s"],
                "full_breakdown_s": s["full"]["breakdown_s"], "load": b["meta"]["loadavg_before"]})
        elif path.endswith(".json"):
            d = json.load(open(path))
            rows.setdefault(name, []).append({"round": rnd, "full_s": d["median_s"]})
    summary = {}
    for name, rs in sorted(rows.items()):
        med = {k: statistics.median(r[k] for r in rs) for k in ("full_s", "blade_s", "blade_amortised_s")
               if all(k in r for r in rs)}
        summary[name] = {"rounds": len(rs), **med, "per_round": rs}
        print(f"{name:24s} rounds {len(rs)}  " + "  ".join(f"{k} {v:.3f}" for k, v in med.items())
              + "   per round full: " + ", ".join(f"{r['full_s']:.3f}" for r in sorted(rs, key=lambda r: r["round"])))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
