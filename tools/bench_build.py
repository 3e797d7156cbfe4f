"""Per-rank peak host memory while building the engines (proxy + reference) of a config.

    launch/local.sh is for blade subcommands; run this under torch's launcher directly:
    .venv/bin/python -m torch.distributed.run --nproc_per_node N tools/bench_build.py \
        -c configs/100m.yaml model.vocab_size=2048 model.max_seq_len=128 [--out FILE]

Each rank reports the growth of its peak resident set size (ru_maxrss) from just before the build
to just after it, and the bytes its engines then hold (tensor by tensor, as `blade bench` counts
them). With `model.init_from`, each rank first loads the checkpoint into a model built as the proxy is
(under deepspeed.zero.Init at ZeRO-3) and reports the peak resident set growth of that load alone
(Linux: the high-water mark is reset through /proc/self/clear_refs; touched pages of the memory-mapped
file count). Rank 0 prints one JSON line with every rank's figures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _load_peak_growth(cfg, world: int) -> int:
    """Bytes by which the resident set peaks above its level before load_pretrained."""
    from blade.bench.probes import MemoryProbe
    from blade.interop.pretrained import load_pretrained
    from blade.model.transformer import Transformer
    from blade.train.engines import deepspeed_config, fp32_build

    with fp32_build(deepspeed_config(cfg, world), enabled=cfg.deepspeed.zero_stage == 3):
        model = Transformer(cfg.model)
    probe = MemoryProbe("cpu")  # VmHWM, reset to the current resident set through clear_refs
    before = probe.reset()
    load_pretrained(model, cfg.model.init_from)
    return probe.peak() - before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out")
    args = p.parse_args()

    import torch

    from blade.bench.probes import held_tensor_bytes
    from blade.config import load_config
    from blade.runtime.dist import all_reduce, init_deepspeed_distributed, rank_and_world
    from blade.train.engines import Engines

    init_deepspeed_distributed(datetime.timedelta(seconds=600))
    rank, world = rank_and_world()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [*args.overrides, "selection.strategy=blade"])
    loading = _load_peak_growth(cfg, world) if cfg.model.init_from else 0
    before = _peak_rss()
    twins = Engines(cfg, world)
    grown = _peak_rss() - before
    held = sum(held_tensor_bytes(e)[0] for e in twins.by_name().values())
    figures = torch.zeros(world, 3, dtype=torch.float64)
    figures[rank] = torch.tensor([grown, held, loading], dtype=torch.float64)
    all_reduce(figures)
    if rank == 0:
        mib = 1024 ** 2
        row = {"ranks": world, "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.train.precision,
               "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in twins.proxy.module.parameters()),
               "build_peak_growth_mib": [round(float(g) / mib, 1) for g in figures[:, 0]],
               "held_after_build_mib": [round(float(h) / mib, 1) for h in figures[:, 1]]}
        if cfg.model.init_from:
            row["init_from"] = cfg.model.init_from
            row["load_peak_growth_mib"] = [round(float(g) / mib, 1) for g in figures[:, 2]]
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
