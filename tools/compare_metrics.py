"""The numerics rule: a change that is not meant to change numbers leaves metrics.jsonl identical.

    python tools/compare_metrics.py RUN_DIR_BEFORE RUN_DIR_AFTER [...more pairs]

Compares every record of two runs' metrics.jsonl (and samples.jsonl when present) after dropping the
fields that measure wall time or name files (time_*_s, *_time_s, step_time_s, path, size_bytes).
Prints one line per pair, IDENTICAL or the first differences, and exits 1 if any pair differs.
"""
from __future__ import annotations

import json
import os
import sys

VOLATILE = ("path", "size_bytes")


def records(run_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    file = os.path.join(run_dir, name)
    if not os.path.exists(file):
        return []
    with open(file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if not (k.startswith("time_") or k.endswith("time_s") or k in VOLATILE)}
            for r in rows]


def compare(before: str, after: str) -> list[str]:
    """Human-readable differences (empty when the runs are identical)."""
    diffs = []
    for name in ("metrics.jsonl", "samples.jsonl"):
        a, b = records(before, name), records(after, name)
        if len(a) != len(b):
            diffs.append(f"{name}: {len(a)} records before, {len(b)} after")
        for i, (ra, rb) in enumerate(zip(a, b)):
            if ra != rb:
                keys = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
                diffs.append(f"{name} record {i} ({ra.get('kind')}, step {ra.get('step')}): " + ", ".join(
                    f"{k}: {str(ra.get(k))[:40]} -> {str(rb.get(k))[:40]}" for k in keys))
    return diffs


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    differ = False
    for before, after in zip(argv[::2], argv[1::2]):
        diffs = compare(before, after)
        n = len(records(before))
        print(f"{after}: {n} records, " + ("IDENTICAL" if not diffs else f"{len(diffs)} differences"))
        for line in diffs[:5]:
            print("  " + line)
        differ |= bool(diffs)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
