"""The exact global top-k alone (blade.train.selection.select_by_score: radix select with histogram
all-reduces) against a gather-all-then-topk baseline (all_gather of every rank's scores, torch.topk
over the concatenation, then the same exact mask), at 1, 2 and 4 ranks and 1e4 ... 1e7 scores per rank.

    .venv/bin/python tools/bench_topk.py [--ranks 1,2,4] [--sizes 1e4,1e5,1e6,1e7] [--repeats 7]
                                         [--max-global 2e7] [--out docs/benchmarks/topk.json]

Each rank holds one micro-batch of N random fp32 scores (all valid), gamma = 0.6. Every timing starts
after a barrier and ends when the rank has its mask; the slowest rank counts (median over repeats).
Both methods must return the same mask (checked on every case). Collective ops and the bytes of the
tensors handed to them are counted with blade.bench.probes.count_collectives (torch dispatch of c10d
ops).
Cases whose gathered copy would exceed --max-global scores are skipped (memory of a 24 GB, 2-core
machine: 4 ranks x 1e7 would gather 4e7 floats per rank and sort them on half a core each).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# after the path set-up, so the tool runs from a checkout without an install
from blade.bench.probes import loadavg, print_tool_result, run_tool_on_ranks  # noqa: E402


def gather_topk_mask(scores, valid, gamma):
    """Baseline: all_gather every score, torch.topk, keep this rank's slice. Same tie rule as the
    exact top-k (largest first, lower global position first) via a stable descending sort."""
    import torch
    import torch.distributed as dist

    from blade.train.selection import keep_count

    world, rank = dist.get_world_size(), dist.get_rank()
    s = scores.float().masked_fill(~valid, float("-inf")).flatten()
    n_valid = torch.tensor([int(valid.sum())], dtype=torch.int64)
    if world > 1:
        dist.all_reduce(n_valid)
        full = torch.empty(world * s.numel(), dtype=s.dtype)
        dist.all_gather_into_tensor(full, s)
    else:
        full = s
    k = keep_count(gamma, int(n_valid))
    idx = torch.topk(full, k, sorted=False).indices
    # exact tie rule: anything above the k-th value, plus the lowest positions among the ties
    kth = full[idx].min()
    keep = full > kth
    ties = (full == kth).nonzero().flatten()
    keep[ties[: k - int(keep.sum())]] = True
    return keep.view(world, -1)[rank].view_as(valid)


def worker(sizes: list[int], repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from blade.bench.probes import count_collectives
    from blade.train.selection import select_by_score

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(1000 + rank)
        scores = torch.randn(1, n, generator=g)
        valid = torch.ones(1, n, dtype=torch.bool)
        row = {"ranks": world, "scores_per_rank": n}
        for name, fn in (("radix", lambda: select_by_score(scores, valid, 0.6)[0]),
                         ("gather", lambda: gather_topk_mask(scores, valid, 0.6))):
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                mask = fn()
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                times.append(float(t))
            with count_collectives() as found:
                mask = fn()
            row[name] = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                         "collectives": found["ops"], "bytes": found["bytes"]}
            row[f"_{name}_mask"] = mask
        same = torch.equal(row.pop("_radix_mask"), row.pop("_gather_mask"))
        ok = torch.tensor([int(same)])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        row["same_mask"] = bool(ok)
        _, stats = select_by_score(scores, valid, 0.6)
        row["rounds"] = stats.rounds
        rows.append(row)
        if rank == 0:
            print(f"  ranks={world} n={n:.0e}: radix {row['radix']['median_ms']:.2f} ms, gather "
                  f"{row['gather']['median_ms']:.2f} ms, same={row['same_mask']}", file=sys.stderr, flush=True)
    if rank == 0:
        print("TOPK " + json.dumps(rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def report(rows: list[dict]) -> str:
    lines = ["| ranks | scores per rank | radix ms (rounds, collectives, bytes) | gather+topk ms (collectives, "
             "bytes) | gather / radix | same mask |", "|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["radix"], r["gather"]
        lines.append(f"| {r['ranks']} | {r['scores_per_rank']:,} | {a['median_ms']:.2f} ({r['rounds']}, "
                     f"{a['collectives']}, {a['bytes']:,}) | {b['median_ms']:.2f} ({b['collectives']}, "
                     f"{b['bytes']:,}) | {b['median_ms'] / a['median_ms']:.1f} x | {r['same_mask']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--sizes", default="1e4,1e5,1e6,1e7")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-global", type=float, default=2e7, help="skip cases with more scores in all")
    p.add_argument("--out", help="write the rows as JSON (and the table as .md next to it)")
    args = p.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    if args.worker:
        return worker(sizes, args.repeats)
    load_before = loadavg()
    rows = []
    for world in (int(w) for w in args.ranks.split(",")):
        todo = [n for n in sizes if n * world <= args.max_global]
        skipped = [n for n in sizes if n not in todo]
        if skipped:
            print(f"skipping {world} ranks x {skipped} (over --max-global)", file=sys.stderr)
        if todo:
            rows += run_tool_on_ranks(__file__, world, ["--sizes", ",".join(str(n) for n in todo),
                                                        "--repeats", str(args.repeats)], "TOPK", ROOT)
    print_tool_result(report(rows), rows, load_before, args.out)

if __name__ == "__main__":
    main()
