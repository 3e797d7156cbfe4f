"""Shard size and `blade prepare` throughput.

    python tools/bench_prepare.py size DATA_DIR [DATA_DIR ...]
        bytes per token (shard bytes / (sequences x seq_len)) of prepared directories, any format
    python tools/bench_prepare.py speed --tokenizer TOK --seq-len 128 --workers 1,2 INPUT [INPUT ...]
        prepare INPUTs once per worker count (same tokenizer), report MB/s and tokens/s, and check that
        every run wrote byte-identical shards
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blade.data.prepare import prepare  # noqa: E402


def bytes_per_token(path: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        m = json.load(f)
    size = sum(os.path.getsize(os.path.join(path, s["name"])) for s in m["shards"])
    tokens = m["num_sequences"] * m["seq_len"]
    return {"dir": path, "format": m["format"], "sequences": m["num_sequences"], "seq_len": m["seq_len"],
            "bytes": size, "bytes_per_token": round(size / tokens, 3)}


def speed(inputs: list[str], tokenizer: str, seq_len: int, workers: list[int]) -> list[dict]:
    mb = sum(os.path.getsize(p) for p in inputs) / 1e6
    rows, outs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            out = os.path.join(tmp, f"w{n}")
            t0 = time.perf_counter()
            m = prepare(inputs, out, seq_len=seq_len, tokenizer=tokenizer, workers=n)
            dt = time.perf_counter() - t0
            tokens = m["num_sequences"] * seq_len
            rows.append({"workers": n, "seconds": round(dt, 2), "input_MB": round(mb, 1),
                         "MB_per_s": round(mb / dt, 2), "tokens_per_s": round(tokens / dt)})
            outs.append((out, [s["name"] for s in m["shards"]]))
        first, names = outs[0]
        for out, other in outs[1:]:
            same = other == names and all(filecmp.cmp(os.path.join(first, n), os.path.join(out, n),
                                                      shallow=False) for n in names)
            for row in rows:
                row["byte_identical"] = row.get("byte_identical", True) and same
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("size")
    ps.add_argument("dirs", nargs="+")
    pv = sub.add_parser("speed")
    pv.add_argument("inputs", nargs="+")
    pv.add_argument("--tokenizer", required=True)
    pv.add_argument("--seq-len", type=int, default=128)
    pv.add_argument("--workers", default="1,2")
    args = p.parse_args()
    rows = ([bytes_per_token(d) for d in args.dirs] if args.cmd == "size" else
            speed(args.inputs, args.tokenizer, args.seq_len, [int(w) for w in args.workers.split(",")]))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
