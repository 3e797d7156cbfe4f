"""The peer anchor of `blade bench` run alone: a plain torch DDP training loop of blade's own model
(blade/bench/anchor.py: the loop and why it is the anchor), on the same model, batch and precision,
without DeepSpeed and without selection. `blade bench --anchor` runs the same loop interleaved with
the strategies, which is the comparison to trust on a shared machine (issue 15: full / DDP goal
<= 1.10 at ZeRO-1/2, <= 1.25 at ZeRO-3).

    .venv/bin/python tools/bench_ddp.py -c configs/100m.yaml model.vocab_size=2048 model.max_seq_len=128 \
        train.micro_batch_size=2 [--ranks 2] [--seq-len 128] [--warmup 2] [--steps 6] [--out ddp.json]

Ranks are gloo processes under torchrun with one thread each, like `launch/local.sh 2 --cmd bench`. A
step's time is the slowest rank's, from a barrier to the end of the optimizer step; the tool prints the
median and the p10-p90 range over the timed steps.
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

TAG = "BENCH_DDP"


def worker(config: str, overrides: list[str], seq_len: int, warmup: int, steps: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from blade.bench.anchor import DDPAnchor
    from blade.config import load_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(config, overrides)
    anchor = DDPAnchor(cfg, rank, "cpu", seq_len)
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        anchor.step()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(t))
    if rank == 0:
        q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
        print(TAG + " " + json.dumps({
            "step_s": times, "median_s": statistics.median(times), "p10_s": q[0], "p90_s": q[-1],
            "ranks": world, "micro_batch_size": cfg.train.micro_batch_size, "seq_len": seq_len,
            "precision": cfg.train.precision, "params": anchor.num_params(), "fused_adamw": cfg.optim.fused,
            "config": config, "overrides": overrides}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="section.key=value, as for blade train")
    p.add_argument("-c", "--config", default=os.path.join(ROOT, "configs", "100m.yaml"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128, help="input tokens per sequence")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.config, a.overrides, a.seq_len, a.warmup, a.steps)
        return 0
    if a.warmup < 1 or a.steps < 1 or a.ranks < 1:
        raise SystemExit("bench_ddp: need --warmup >= 1, --steps >= 1 and --ranks >= 1")
    from blade.bench.probes import loadavg, run_tool_on_ranks

    before = loadavg()
    args = ["-c", os.path.abspath(a.config), "--seq-len", str(a.seq_len), "--warmup", str(a.warmup),
            "--steps", str(a.steps), *a.overrides]
    result = run_tool_on_ranks(__file__, a.ranks, args, TAG, ROOT)
    result.update(loadavg_before=before, loadavg_after=loadavg())
    print(f"DDP anchor ({result['ranks']} gloo ranks x 1 thread, {result['precision']}, "
          f"{'fused' if result['fused_adamw'] else 'loop'} AdamW, micro-batch "
          f"{result['micro_batch_size']} x {result['seq_len']} tokens, {result['params']:,} parameters): "
          f"{result['median_s']:.3f} s/step median (p10 {result['p10_s']:.3f}, p90 {result['p90_s']:.3f}) "
          f"over {len(result['step_s'])} steps; load average {before} -> {result['loadavg_after']}")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
