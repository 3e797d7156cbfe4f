"""The reference sync w <- u: blade's local partition copy (engines.sync_reference) against a
gather-based copy, on 2 ranks, ZeRO-3, for the tiny (quickstart) and the ~100M model (configs/100m.yaml
with the built-in data's vocabulary).

    .venv/bin/python tools/bench_sync.py [--ranks 2] [--configs tiny,100m] [--precisions fp32,bf16]
                                         [--repeats 5] [--out docs/benchmarks/sync.json]

Gather-based copy, what a framework without aligned partitions does: for every parameter pair,
deepspeed.zero.GatheredParameters([u_i, w_i], modifier_rank=0) and copy u_i into w_i (an all-gather of
both, then a broadcast from rank 0 on exit), then write w's fp32 master from u's
(safe_get_full_fp32_param: another all-gather; safe_set_full_fp32_param: local), then zero the moments.
Both methods are checked to leave w's gathered weights and fp32 masters bitwise equal to u's. Collective
ops and tensor bytes come from blade.bench.probes.count_collectives (torch dispatch of c10d ops:
DeepSpeed's stored all-gather handles are seen too). Both engines first take one real optimizer step (so
that moments exist), on micro-batch 1 x 32 tokens: the sync does not depend on the batch.
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

CONFIGS = {"tiny": ("configs/quickstart.yaml", []),
           "100m": ("configs/100m.yaml", ["model.vocab_size=2048", "model.max_seq_len=128"])}


def gather_copy(proxy, reference) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from blade.runtime import zero

    zero.drop_gathered(reference)  # GatheredParameters returns stale data for params left gathered
    zero.drop_gathered(proxy)
    rank = dist.get_rank()
    with torch.no_grad():
        for a, b in zip(proxy.module.parameters(), reference.module.parameters(), strict=True):
            with deepspeed.zero.GatheredParameters([a, b], modifier_rank=0):
                if rank == 0:
                    b.data.copy_(a.data)
            full = safe_get_full_fp32_param(a)
            if full is not None:
                safe_set_full_fp32_param(b, full)
    zero.reset_optimizer_state(reference)


def _state(engine) -> list:
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from blade.runtime import zero

    zero.drop_gathered(engine)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        weights = [p.data.detach().clone() for p in params]
    masters = [safe_get_full_fp32_param(p) for p in params]
    zero.drop_gathered(engine)
    return weights + [m.clone() if m is not None else torch.zeros(0) for m in masters]


def worker(configs: list[str], precisions: list[str], repeats: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from blade.bench.probes import count_collectives
    from blade.config import load_config
    from blade.runtime.dist import init_deepspeed_distributed
    from blade.train import engines

    torch.set_num_threads(1)
    init_deepspeed_distributed(datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for name in configs:
        path, extra = CONFIGS[name]
        for precision in precisions:
            cfg = load_config(os.path.join(ROOT, path), extra + [f"train.precision={precision}",
                                                                "train.micro_batch_size=1"])
            P = engines.build_engine(cfg, world, seed=1, schedule=True)
            R = engines.build_engine(cfg, world, seed=2, schedule=False)
            g = torch.Generator().manual_seed(rank)
            for engine in (P, R):  # one real step each: the moments exist, the weights differ
                x = torch.randint(0, cfg.model.vocab_size, (1, 32), generator=g)
                engine.backward(engine(x, x).mean())
                engine.step()
            row = {"config": name, "precision": precision, "ranks": world,
                   "params": P.module.num_params()}
            for method, fn in (("local", engines.sync_reference), ("gather", gather_copy)):
                x = torch.randint(0, cfg.model.vocab_size, (1, 32), generator=g)
                R.backward(R(x, x).mean())  # w moves away from u (weights, master, moments)
                R.step()
                differ = not all(torch.equal(a, b) for a, b in zip(_state(P), _state(R)))
                with count_collectives() as found:
                    fn(P, R)
                ok = differ and all(torch.equal(a, b) for a, b in zip(_state(P), _state(R)))
                times = []
                for _ in range(repeats):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn(P, R)
                    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    times.append(float(t))
                okt = torch.tensor([int(ok)])
                dist.all_reduce(okt, op=dist.ReduceOp.MIN)
                row[method] = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                               "collectives": found["ops"], "bytes": found["bytes"],
                               "ops": sorted(set(found["names"])), "equal": bool(okt)}
                if rank == 0:
                    print(f"  {name} {precision} {method}: {row[method]['median_ms']:.2f} ms, "
                          f"{found['ops']} collectives, equal={bool(okt)}", file=sys.stderr, flush=True)
            rows.append(row)
            del P, R
    if rank == 0:
        print("SYNC " + json.dumps(rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def report(rows: list[dict]) -> str:
    lines = ["| model | params | precision | ranks | local copy ms (collectives, bytes) | gather-based ms "
             "(collectives, bytes) | gather / local | both exact |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["local"], r["gather"]
        lines.append(f"| {r['config']} | {r['params']:,} | {r['precision']} | {r['ranks']} | "
                     f"{a['median_ms']:.2f} ({a['collectives']}, {a['bytes']:,}) | {b['median_ms']:.1f} "
                     f"({b['collectives']}, {b['bytes']:,}) | {b['median_ms'] / a['median_ms']:.0f} x | "
                     f"{a['equal'] and b['equal']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--configs", default="tiny,100m")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the rows as JSON")
    args = p.parse_args()
    configs, precisions = args.configs.split(","), args.precisions.split(",")
    if args.worker:
        return worker(configs, precisions, args.repeats)
    load_before = loadavg()
    rows = run_tool_on_ranks(__file__, args.ranks, ["--configs", args.configs, "--precisions", args.precisions,
                                                   "--repeats", str(args.repeats)], "SYNC", ROOT)
    print_tool_result(report(rows), rows, load_before, args.out)

if __name__ == "__main__":
    main()
