"""Do the bf16 head's selection decisions differ from the fp32-math head's only on near-ties?

    python tools/head_selection_check.py runs/qsbf/checkpoints/step_000140 data/builtin/train \
        [--batches 20] [--gamma 0.6] [--global-batch 16]

Loads the proxy u and the reference w of a bf16 blade checkpoint (their fp32 master weights, cast to
bf16 as training runs them), scores `--batches` global batches of the training data with both heads
(the body is the same bf16 model: only the head differs), takes the top ceil(gamma * n) scores of
each batch as the step does, and prints how many decisions differ, and how many of each head's
decisions differ from those of the fp32 model (fp32 body and head on the same master weights). A flipped token is a near-tie when
its score lies within the two heads' largest score difference of either head's threshold: no head
can order such tokens better than its own rounding.

The fp32-math head is the one blade used before the bf16 head (blade/model/transformer.py,
ChunkedCrossEntropy, commit 82207e8): bf16 h and weight upcast to fp32, logits in fp32.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import io
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blade.config import ModelConfig  # noqa: E402
from blade.data.reader import GlobalOrder, ShardDataset, batch_positions, _micro_batch  # noqa: E402
from blade.model.transformer import IGNORE_INDEX, ChunkedCrossEntropy, Transformer  # noqa: E402
from blade.runtime.checkpoint import read_state  # noqa: E402
from blade.runtime.safe_load import refuse_unsafe  # noqa: E402


def load_model(path: str, tag: str, model_cfg) -> Transformer:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    refuse_unsafe(glob.glob(os.path.join(path, tag, "*.pt")), f"the {tag} weights in {path}")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sd = get_fp32_state_dict_from_zero_checkpoint(path, tag=tag)
    model = Transformer(model_cfg)
    model.load_state_dict({k: v for k, v in sd.items() if k in model.state_dict()}, strict=False)
    return model.eval()


def fp32_math_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The earlier head: logits of the upcast inputs in fp32."""
    logits = h.float() @ weight.float().t()
    safe = targets.clamp_min(0)
    loss = torch.logsumexp(logits, -1) - logits.gather(1, safe[:, None]).squeeze(1)
    return loss.masked_fill(targets == IGNORE_INDEX, 0.0)


def top_mask(scores: torch.Tensor, valid: torch.Tensor, gamma: float) -> tuple[torch.Tensor, float]:
    k = math.ceil(gamma * int(valid.sum()))
    s = scores.masked_fill(~valid, -math.inf)
    idx = torch.topk(s, k).indices
    mask = torch.zeros_like(valid)
    mask[idx] = True
    return mask, float(s[idx].min())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--gamma", type=float, default=0.6)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per global batch")
    a = p.parse_args()
    state = read_state(a.checkpoint)
    model_cfg = ModelConfig(**state["config"]["model"])
    u32, w32 = (load_model(a.checkpoint, tag, model_cfg) for tag in ("proxy", "reference"))
    u, w = (copy.deepcopy(m).bfloat16() for m in (u32, w32))
    ds = ShardDataset(a.data, model_cfg.vocab_size)
    order = GlobalOrder(ds.shard_sizes, seed=0, shuffle=True)
    total = flips = near = band = 0
    spread, diffs, vs_fp32 = [], [], {"old": 0, "new": 0}
    max_diff = 0.0
    for b in range(a.batches):
        batch = _micro_batch(ds, order, batch_positions(b * a.global_batch, 0, a.global_batch, 1, 0))
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
        valid = targets != IGNORE_INDEX
        scores = {}
        with torch.no_grad():
            hs = [m._hidden(inputs).reshape(-1, model_cfg.dim) for m in (u, w)]
            ws = [m.lm_head.weight for m in (u, w)]
            new = [ChunkedCrossEntropy.apply(h, W, targets, model_cfg.loss_chunk_tokens) for h, W in zip(hs, ws)]
            old = [fp32_math_loss(h, W, targets) for h, W in zip(hs, ws)]
            exact = [m(inputs, tokens[:, 1:]).reshape(-1) for m in (u32, w32)]
        scores["new"], scores["old"] = new[0] - new[1], old[0] - old[1]
        m_fp32, _ = top_mask(exact[0] - exact[1], valid, a.gamma)
        diffs.append((scores["new"] - scores["old"])[valid].abs())
        diff = float((scores["new"] - scores["old"])[valid].abs().max())
        max_diff = max(max_diff, diff)
        (m_new, t_new), (m_old, t_old) = (top_mask(scores[k], valid, a.gamma) for k in ("new", "old"))
        flipped = m_new != m_old
        vs_fp32["old"] += int((m_old != m_fp32).sum())
        vs_fp32["new"] += int((m_new != m_fp32).sum())
        total += int(valid.sum())
        flips += int(flipped.sum())
        close = ((scores["old"] - t_old).abs() <= diff) | ((scores["new"] - t_new).abs() <= diff)
        near += int((flipped & close).sum())
        band += int((close & valid).sum())
        spread.append(float(scores['old'][valid].std()))
    print(f"{total} scored tokens in {a.batches} batches of {a.global_batch} sequences, gamma {a.gamma}: "
          f"{flips} decisions differ ({100 * flips / total:.2f} %), {near} of them near-ties; "
          f"largest |score difference| between the heads {max_diff:.4f} (score std "
          f"{sum(spread) / len(spread):.3f}); {band} tokens ({100 * band / total:.1f} %) lie that close "
          f"to a threshold")
    d = torch.cat(diffs)
    print(f"|score difference| median {float(d.median()):.4f}, p99 {float(d.quantile(0.99)):.4f}; decisions "
          f"that differ from the fp32 model's (fp32 body and head): fp32-math head {vs_fp32['old']} "
          f"({100 * vs_fp32['old'] / total:.2f} %), bf16 head {vs_fp32['new']} "
          f"({100 * vs_fp32['new'] / total:.2f} %)")
    return 0 if near == flips else 1


if __name__ == "__main__":
    sys.exit(main())
