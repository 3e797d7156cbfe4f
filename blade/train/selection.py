"""Token selection: the exact global top-k (BLADE's Frank-Wolfe oracle) and the baselines.

Every rank holds M micro-batches of N local token scores. The block is the whole global batch, in
the GLOBAL order: micro-batch major, then rank, then local index, i.e. global position
`(m * world + rank) * N + i`. `global_topk_mask` keeps exactly the k tokens that
`torch.sort(concat, descending=True, stable=True)` of the valid scores concatenated in that order
would keep (largest first, ties to the lower position; or, with a tie seed, ties to the larger random
key and then the lower position), exchanging only small tensors:

1. one all-reduce: n_valid, the number of non-finite scores and a 65536-bin histogram of the high
   16 bits of an order-preserving uint32 key of each float32 score (a radix select, 16 bits a round);
2. one all-reduce of the histogram of the low 16 bits of the keys in the chosen high bin: this
   finds the k-th largest key exactly;
3. only when the threshold is tied and not all ties fit: with a tie seed (select_by_score in training),
   the same two-digit select among the tied tokens on a random 32-bit key per global position (two
   all-reduces), so that equal scores are not chosen by position; then, for what is still tied (or
   without a tie seed), one all-reduce of the [M * world] counts of keys equal to the threshold,
   which tells each (micro-batch, rank) how many of its ties to keep, in global order.

Hence at most MAX_ROUNDS collectives per call, whatever the batch size and the world size. The
rounds, not the bytes, are what costs (an all-reduce is latency-bound below about a megabyte: on
gloo 0.2-0.5 ms whether it carries 16 bytes or 512 KiB), so two 16-bit digits (2 x 512 KiB) beat
four 8-bit ones (4 x 2 KiB) and the counts ride along with the first digit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from blade.runtime.dist import all_reduce, rank_and_world

MAX_ROUNDS = 5  # 1 (counts + high digit) + 1 (low digit) [+ 2 (tie keys' digits)] + 1 (ties by position)
_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS


@dataclass(frozen=True)
class TopkStats:
    """What one selection did; the same on every rank but n_local."""

    k: int            # tokens asked for
    n_valid: int      # valid tokens in the global batch
    n_selected: int   # tokens kept in the global batch: min(k, n_valid)
    n_local: int      # tokens kept on this rank
    threshold: float  # the k-th largest score (the smallest kept); nan when nothing is kept
    rounds: int       # collectives used (counted also in a world of one, where they are no-ops)


# ----------------------------------------------------------------------------- exact top-k


def _sortable_key(scores: torch.Tensor) -> torch.Tensor:
    """float32 -> uint32 (held in int64) in the same order: flip all bits of negatives, the sign
    bit of the others. -0.0 becomes +0.0 first, so that they tie as in a sort. Every finite score
    maps above 0x007FFFFF (0 itself is a NaN pattern)."""
    x = scores.float().masked_fill(scores == 0, 0.0)
    i = x.view(torch.int32)
    # i >> 31 is -1 for negatives: flip their 31 low bits; then + 2^31 (as unsigned) flips the sign
    return (i ^ ((i >> 31) & 0x7FFFFFFF)).to(torch.int64) + 0x80000000


def _key_to_float(key: int) -> float:
    bits = key ^ 0x80000000 if key & 0x80000000 else key ^ 0xFFFFFFFF
    signed = bits - (1 << 32) if bits & 0x80000000 else bits
    return torch.tensor([signed], dtype=torch.int32).view(torch.float32).item()


def _pick_bin(hist: torch.Tensor, rest: int) -> tuple[int, int, int]:
    """Bin holding the rest-th largest key, its rank (1-based) inside that bin, and the bin's count."""
    bins = hist.nonzero().flatten().flip(0)  # the non-empty bins, highest first (at most one per key)
    at_or_above = hist[bins].cumsum(0)       # [i]: keys in bins >= bins[i]
    i = int(torch.searchsorted(at_or_above, rest))
    if i >= bins.numel():
        raise AssertionError("radix select: fewer candidates than k")  # n_valid >= k rules this out
    b = int(bins[i])
    count = int(hist[b])
    return b, rest - (int(at_or_above[i]) - count), count


def _select_key(key: torch.Tensor, cand: torch.Tensor, rest: int, group,
                high_hist: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    """The rest-th largest 32-bit `key` among the candidates of all ranks, by two 16-bit digits:
    (that key, how many of its ties to keep, its global tie count, all-reduces used). The high
    digit's histogram may come in already reduced (the first round carries it with the counts)."""
    high, rounds = key >> _DIGIT_BITS, 0
    if high_hist is None:
        high_hist = all_reduce(torch.bincount(high[cand], minlength=_BINS), group=group)
        rounds += 1
    b, rest, _ = _pick_bin(high_hist, rest)
    low = key[cand & (high == b)] & (_BINS - 1)  # the candidates' keys in the chosen high bin
    c, rest, n_tied = _pick_bin(all_reduce(torch.bincount(low, minlength=_BINS), group=group), rest)
    return (b << _DIGIT_BITS) | c, rest, n_tied, rounds + 1


def _global_topk(scores: torch.Tensor, valid: torch.Tensor, k_of: Callable[[int], int],
                 group, tie_keys: Callable[[], torch.Tensor] | None = None) -> tuple[torch.Tensor, TopkStats]:
    """The top-k with k = k_of(n_valid), n_valid known only after the first all-reduce. Ties at the
    threshold go to the larger `tie_keys()` (uint32 values in int64, [M, N]) when given, then (and
    otherwise) to the lower global position."""
    if scores.dim() < 2 or scores.shape != valid.shape:
        raise ValueError(f"selection: scores {tuple(scores.shape)} and valid "
                         f"{tuple(valid.shape)} must both be [M, N, ...]")
    shape = scores.shape
    scores, valid = scores.reshape(shape[0], -1), valid.reshape(shape[0], -1).bool()
    rank, world = rank_and_world(group)
    device = scores.device

    key = _sortable_key(scores).masked_fill_(~valid, 0)  # invalid: below every finite score
    high = (key >> _DIGIT_BITS).flatten()
    counts = torch.cat([torch.stack([valid.sum(), (valid & ~torch.isfinite(scores)).sum()]),
                        torch.bincount(high, minlength=_BINS)])
    counts = all_reduce(counts, group=group)  # round 1: counts and the high digit's histogram
    n_valid, n_bad = counts[:2].tolist()
    rounds = 1
    if n_bad:
        raise ValueError(f"selection: {n_bad} non-finite scores (NaN/Inf) in the global batch; "
                         "the step's non-finite guard should have skipped this batch: check the losses")
    k = k_of(n_valid)
    if k < 0:
        raise ValueError(f"selection: k must be >= 0, got {k}")
    n_selected = min(k, n_valid)

    def stats(mask: torch.Tensor, threshold: float) -> TopkStats:
        return TopkStats(k, n_valid, n_selected, int(mask.sum()), threshold, rounds)

    if n_selected == 0:
        mask = torch.zeros_like(valid)
        return mask.reshape(shape), stats(mask, math.nan)
    if n_selected == n_valid:  # everything valid; one more round only to report the threshold
        local_min = scores[valid].float().min() if valid.any() else torch.tensor(math.inf)
        low = all_reduce(local_min.reshape(1).to(device), dist.ReduceOp.MIN, group)
        rounds += 1
        return valid.reshape(shape).clone(), stats(valid, low.item())

    prefix, rest, n_tied, used = _select_key(key, valid, n_selected, group, high_hist=counts[2:])
    rounds += used                           # prefix: the k-th largest key; `rest` of its ties are kept
    threshold = _key_to_float(prefix)
    mask, tied = key > prefix, key == prefix
    if rest < n_tied and tie_keys is not None:  # the same radix select among the ties, on their keys
        tk = tie_keys().reshape(shape[0], -1).to(device)
        tie_prefix, rest, n_tied, used = _select_key(tk, tied, rest, group)
        rounds += used
        mask |= tied & (tk > tie_prefix)
        tied &= tk == tie_prefix
    if rest == n_tied:
        mask |= tied
    else:  # hand the `rest` kept ties out in global order: (micro-batch, rank), then local index
        per_block = torch.zeros(shape[0], world, dtype=torch.int64, device=device)
        per_block[:, rank] = tied.sum(1)
        per_block = all_reduce(per_block.flatten(), group=group)
        rounds += 1
        before = per_block.cumsum(0) - per_block
        quota = (rest - before).clamp(min=0).minimum(per_block).view(shape[0], world)[:, rank]
        mask |= tied & (tied.cumsum(1) <= quota[:, None])
    return mask.reshape(shape), stats(mask, threshold)


def global_topk_mask(scores: torch.Tensor, valid: torch.Tensor, k: int,
                     group=None) -> tuple[torch.Tensor, TopkStats]:
    """Exact top-k of the valid scores [M, N] of all ranks (k > n_valid keeps all valid tokens).

    [M, B, T] is flattened to [M, B * T]. Scores may be fp32/bf16/fp16; M must be the same on every
    rank. Raises ValueError on every
    rank alike if any valid score is NaN/Inf.
    """
    return _global_topk(scores, valid, lambda n_valid: k, group)


# ----------------------------------------------------------------------------- strategies


def keep_count(gamma: float, n_valid: int) -> int:
    """ceil(gamma * n_valid) in exact arithmetic on gamma's decimal form (0.6 * 5 -> 3, not 4)."""
    g = gamma if isinstance(gamma, Fraction) else Fraction(repr(float(gamma)))
    if not 0 <= g <= 1:
        raise ValueError(f"selection: keep ratio gamma must be in [0, 1], got {gamma}")
    return math.ceil(g * n_valid)


def _generator_seed(seed: int, step: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + step) % (1 << 63)


def _full_draw(draw, shape: tuple[int, int, int], seed: int, step: int) -> torch.Tensor:
    """One draw [M, world, N] over the whole global batch, seeded by (seed, step)."""
    return draw(shape, torch.Generator().manual_seed(_generator_seed(seed, step)))


def _global_draw(draw, valid: torch.Tensor, seed: int, step: int, group) -> torch.Tensor:
    """This rank's slice of one draw over the whole global batch, seeded by (seed, step): the value
    at a global position does not depend on the world size. Cost: M * world * N numbers per rank."""
    rank, world = rank_and_world(group)
    m, n = valid.shape[0], valid[0].numel()
    return _full_draw(draw, (m, world, n), seed, step)[:, rank].reshape(valid.shape).to(valid.device)


def _uniform(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen)


def random_keys(m: int, world: int, n: int, seed: int, step: int) -> torch.Tensor:
    """The keys select_random ranks by, for the whole global batch in global order: [M * world, N]
    (the exact oracle's view of the random baseline, on one rank)."""
    return _full_draw(_uniform, (m, world, n), seed, step).reshape(m * world, n)


def select_random(valid: torch.Tensor, gamma: float, seed: int, step: int,
                  group=None) -> tuple[torch.Tensor, TopkStats]:
    """A uniformly random ceil(gamma * n_valid) of the valid tokens (the `random` baseline).

    Token keys depend only on (seed, step, global position), so the selection does not depend on
    the world size. (float32 keys may tie, rarely; ties go to the lower position, a negligible bias.)
    """
    keys = _global_draw(_uniform, valid, seed, step, group)
    return _global_topk(keys, valid, lambda nv: keep_count(gamma, nv), group)


def select_by_score(scores: torch.Tensor, valid: torch.Tensor, gamma: float, group=None,
                    tie_seed: tuple[int, int] | None = None) -> tuple[torch.Tensor, TopkStats]:
    """The top ceil(gamma * n_valid) scores of the global batch (`rho1` and `blade`).

    With tie_seed = (seed, step), tokens tied at the threshold (equal scores: right after a sync,
    quantised losses) are chosen by a random key per global position drawn from (seed, step), not
    by position; the choice stays exact, reproducible and independent of the world size."""
    tie_keys = None
    if tie_seed is not None:
        def tie_keys():
            return _global_draw(lambda shape, gen: torch.randint(0, 1 << 32, shape, generator=gen),
                                valid, *tie_seed, group)
    return _global_topk(scores, valid, lambda nv: keep_count(gamma, nv), group, tie_keys)


def frank_wolfe_weights(mask: torch.Tensor, valid: torch.Tensor, gamma: float,
                        eta: float) -> torch.Tensor:
    """Soft Frank-Wolfe step from the uniform point gamma: (1 - eta) * gamma + eta * mask on valid
    tokens, 0 elsewhere (eta = 1 gives the hard mask)."""
    alpha = (1.0 - eta) * gamma + eta * mask.float()
    return torch.where(valid.bool(), alpha, torch.zeros_like(alpha))


# ----------------------------------------------------------------------------- loss


def masked_mean_loss_scale(losses: Sequence[torch.Tensor], weights: torch.Tensor | Sequence,
                           total_weight: float, world_size: int) -> list[torch.Tensor]:
    """Per-micro-batch losses whose gradients add up to that of the global weighted mean.

    losses[m] holds this rank's per-token losses of micro-batch m (any shape with weights[m].numel()
    elements); total_weight is W = the sum of all weights over all ranks and micro-batches. Returns
    L[m] = (losses[m] * weights[m]).sum() * world_size / W. The trainer calls
    `engine.backward(L[m], scale_wrt_gas=False)` for every m (gradients add up over micro-batches,
    no 1/M) and DeepSpeed averages gradients over the world_size data-parallel ranks (1/world), so
    the step uses (1/world) * sum_ranks sum_m grad L[m] = grad of sum(w * l) / W over the global
    batch. With W == 0 (nothing selected) the losses are zeros that still carry the graph.
    """
    scale = world_size / total_weight if total_weight > 0 else 0.0
    return [(loss.float() * w.reshape(loss.shape).float()).sum() * scale
            for loss, w in zip(losses, weights, strict=True)]
