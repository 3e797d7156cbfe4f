"""Forward + backward of the model module alone (no DeepSpeed, no optimizer), old commit vs new,
interleaved in one process on one thread: what the head, GQA and RMSNorm changes save by themselves.

    .venv/bin/python docs/benchmarks/cpu-2core_2026-12-02b/model_fwd_bwd.py OLD_WORKTREE [--reps 12]

Both models are the ~100M shape of the bench (configs/100m.yaml, vocab 2048, 128 tokens, micro-batch 2)
cast to bf16 as DeepSpeed's bf16 mode runs them, with the same weights; loss = sum of w * per-token CE
with random weights w. Also a GQA variant (n_kv_heads 4), where the K/V repeat is gone.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

from blade.config import load_config  # noqa: E402
from blade.model import transformer as new  # noqa: E402


def load_old(tree: str):
    spec = importlib.util.spec_from_file_location("old_transformer", os.path.join(tree, "blade/model/transformer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("old")
    p.add_argument("--reps", type=int, default=12)
    a = p.parse_args()
    torch.set_num_threads(1)
    old = load_old(a.old)
    base = load_config(os.path.join(ROOT, "configs/100m.yaml"), ["model.vocab_size=2048", "model.max_seq_len=128"]).model
    for label, cfg in (("MHA (100m.yaml)", base), ("GQA n_kv_heads=4", replace(base, n_kv_heads=4))):
        torch.manual_seed(0)
        m_new = new.Transformer(cfg).bfloat16()
        m_old = old.Transformer(cfg).bfloat16()
        m_old.load_state_dict(m_new.state_dict())
        g = torch.Generator().manual_seed(1)
        tokens, targets = (torch.randint(0, cfg.vocab_size, (2, 128), generator=g) for _ in range(2))
        w = torch.rand(2, 128, generator=g)
        times = {"old": [], "new": []}
        for r in range(a.reps + 2):
            for name, m in (("old", m_old), ("new", m_new)) if r % 2 else (("new", m_new), ("old", m_old)):
                m.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                (m(tokens, targets) * w).sum().backward()
                if r >= 2:
                    times[name].append(time.perf_counter() - t0)
        o, n = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"{label}: forward+backward old {o:.3f} s, new {n:.3f} s (median of {a.reps}), speed-up {o / n:.2f}x")


if __name__ == "__main__":
    main()
