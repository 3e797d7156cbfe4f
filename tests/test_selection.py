"""blade.selection against single-process truth: torch.sort(stable) of the valid scores
concatenated in global order (micro-batch, rank, local index).

A case is built GLOBALLY as [M, world, N] (rank r holds [:, r]), so its row-major flattening is the
global order and every rank can rebuild it from a seed.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from blade.train.selection import (
    MAX_ROUNDS,
    TopkStats,
    frank_wolfe_weights,
    global_topk_mask,
    keep_count,
    masked_mean_loss_scale,
    select_by_score,
    select_random,
)
from blade.runtime.dist import all_reduce_sum
from tests.dist_harness import run_distributed

EXTREMES = [3.4028235e38, -3.4028235e38, 1e30, -1e30, 1e-38, -1e-38, 1e-45, -1e-45, 0.0, -0.0, 1.0]
KINDS = ("random", "dups", "equal", "negzero", "extremes", "bf16", "fp16", "empty_rank")


def make_case(kind: str, world: int, m: int, n: int, seed: int):
    """Global (scores, valid), both [M, world, N]."""
    g = torch.Generator().manual_seed(seed)
    shape = (m, world, n)
    valid = torch.rand(shape, generator=g) < 0.8

    def pick(values):
        return torch.tensor(values)[torch.randint(len(values), shape, generator=g)]

    scores = {
        "random": lambda: torch.randn(shape, generator=g),
        "dups": lambda: torch.randint(0, 4, shape, generator=g).float(),
        "equal": lambda: torch.full(shape, 1.5),
        "negzero": lambda: pick([0.0, -0.0, 1.0, -1.0]),
        "extremes": lambda: pick(EXTREMES),
        "bf16": lambda: torch.randn(shape, generator=g).to(torch.bfloat16),
        "fp16": lambda: torch.randn(shape, generator=g).to(torch.float16),
        "empty_rank": lambda: torch.randn(shape, generator=g),
    }[kind]()
    if kind == "empty_rank":
        valid[:, 0] = False
    return scores, valid


def reference(scores: torch.Tensor, valid: torch.Tensor, k: int):
    """(mask, k-th score) by a stable descending sort of the valid scores in global order."""
    idx = valid.flatten().nonzero().squeeze(1)
    values, order = torch.sort(scores.flatten()[idx].float(), descending=True, stable=True)
    mask = torch.zeros(valid.numel(), dtype=torch.bool)
    mask[idx[order[:k]]] = True
    kth = values[min(k, len(values)) - 1].item() if k and len(values) else math.nan
    return mask.view(valid.shape), kth


def ks_for(valid: torch.Tensor) -> list[int]:
    n = int(valid.sum())
    return sorted({0, 1, n // 2, n, n + 3})


def check(masks: list, stats: list[TopkStats], scores, valid, k: int, label: str = ""):
    """Rank masks (each [M, N]) stacked on dim 1 must equal the reference; stats must agree."""
    want, kth = reference(scores, valid, k)
    got = torch.stack(masks, dim=1)
    assert torch.equal(got, want), label
    n_valid = int(valid.sum())
    for s in stats:
        assert (s.k, s.n_valid, s.n_selected) == (k, n_valid, min(k, n_valid)), label
        assert s.rounds <= MAX_ROUNDS, label
        assert s.threshold == kth or (math.isnan(s.threshold) and math.isnan(kth)), label
    assert sum(s.n_local for s in stats) == int(got.sum()) == min(k, n_valid), label


def _rank_cases(rank, world, cases):
    """global_topk_mask on this rank's slice of each case; also counts the collectives issued.
    Results go back as plain lists: the harness's ranks exit before tensors could be shared."""
    issued = [0]
    all_reduce = dist.all_reduce

    def counting(*args, **kwargs):
        issued[0] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting
    out = []
    for kind, m, n, seed, k in cases:
        scores, valid = make_case(kind, world, m, n, seed)
        before = issued[0]
        mask, stats = global_topk_mask(scores[:, rank], valid[:, rank], k)
        out.append((mask.tolist(), stats, issued[0] - before))
    return out


def run_cases(world: int, cases: list):
    per_rank = run_distributed(_rank_cases, world, args=(cases,))
    for i, (kind, m, n, seed, k) in enumerate(cases):
        scores, valid = make_case(kind, world, m, n, seed)
        results = [r[i] for r in per_rank]
        label = f"{kind} M={m} N={n} seed={seed} k={k}"
        masks = [torch.tensor(r[0], dtype=torch.bool).view(m, n) for r in results]
        check(masks, [r[1] for r in results], scores, valid, k, label)
        assert all(r[2] == r[1].rounds for r in results), label


# ----------------------------------------------------------------------------- world of one


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_single_process(kind, m):
    scores, valid = make_case(kind, 1, m, 37, seed=7)
    for k in ks_for(valid):
        mask, stats = global_topk_mask(scores[:, 0], valid[:, 0], k)
        check([mask], [stats], scores, valid, k, f"k={k}")


def test_rounds_by_case():
    scores, valid = make_case("random", 1, 2, 50, seed=1)
    n = int(valid.sum())
    assert global_topk_mask(scores[:, 0], valid[:, 0], 0)[1].rounds == 1
    assert global_topk_mask(scores[:, 0], valid[:, 0], n)[1].rounds == 2
    assert global_topk_mask(scores[:, 0], valid[:, 0], n // 2)[1].rounds == 2  # distinct: no ties
    equal = torch.ones(2, 50)
    assert global_topk_mask(equal, valid[:, 0], n // 2)[1].rounds == 3  # ties handed out by position
    tied = select_by_score(equal, valid[:, 0], 0.5, tie_seed=(1, 2))[1]
    assert tied.rounds == 4 and MAX_ROUNDS == 5  # + 2 rounds on the tie keys; 5 if those tie too


def test_trailing_dims_are_flattened():
    scores, valid = torch.randn(2, 3, 5), torch.rand(2, 3, 5) < 0.7
    mask, _ = global_topk_mask(scores, valid, 9)
    flat, _ = global_topk_mask(scores.view(2, 15), valid.view(2, 15), 9)
    assert mask.shape == (2, 3, 5) and torch.equal(mask.view(2, 15), flat)


def test_non_finite_valid_scores_raise_and_invalid_ones_are_ignored():
    scores, valid = torch.randn(2, 6), torch.ones(2, 6, dtype=torch.bool)
    scores[1, 2], scores[0, 0] = math.nan, math.inf
    with pytest.raises(ValueError, match="2 non-finite scores"):
        global_topk_mask(scores, valid, 3)
    valid[1, 2] = valid[0, 0] = False
    mask, stats = global_topk_mask(scores, valid, 3)
    assert stats.n_selected == 3 and not mask[1, 2] and not mask[0, 0]


def test_negative_k_is_rejected():
    with pytest.raises(ValueError):
        global_topk_mask(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), -1)


score_values = st.one_of(st.sampled_from(EXTREMES + [2.0, 3.0, -2.0]),
                         st.floats(allow_nan=False, allow_infinity=False, width=32))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_topk_property(data):
    m = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(0, 12))
    values = data.draw(st.lists(score_values, min_size=m * n, max_size=m * n))
    flags = data.draw(st.lists(st.booleans(), min_size=m * n, max_size=m * n))
    scores = torch.tensor(values, dtype=torch.float32).view(m, 1, n)
    valid = torch.tensor(flags, dtype=torch.bool).view(m, 1, n)
    k = data.draw(st.integers(0, m * n + 2))
    mask, stats = global_topk_mask(scores[:, 0], valid[:, 0], k)
    check([mask], [stats], scores, valid, k)


# ----------------------------------------------------------------------------- several ranks


def test_topk_two_ranks_edge_cases():
    cases = []
    for kind in KINDS:
        for m in (1, 2):
            _, valid = make_case(kind, 2, m, 23, seed=3)
            cases += [(kind, m, 23, 3, k) for k in ks_for(valid)]
    run_cases(2, cases)


def test_topk_two_ranks_random_sweep():
    rng = random.Random(0)
    cases = []
    for seed in range(50):
        kind, m, n = rng.choice(KINDS), rng.randint(1, 3), rng.randint(0, 30)
        _, valid = make_case(kind, 2, m, n, seed)
        cases.append((kind, m, n, seed, rng.randint(0, int(valid.sum()) + 2)))
    run_cases(2, cases)


def test_topk_four_ranks():
    cases = [("dups", 2, 16, 5, k) for k in (1, 17, 40)]
    cases += [("empty_rank", 1, 16, 6, k) for k in (0, 20, 48)]
    run_cases(4, cases)


def _rank_nan(rank, world):
    scores, valid = torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool)
    if rank == 1:
        scores[1, 3] = math.nan
    try:
        global_topk_mask(scores, valid, 5)
    except ValueError as e:
        return str(e)
    return "no error"


def test_nan_raises_on_every_rank():
    messages = run_distributed(_rank_nan, 2)
    assert messages[0] == messages[1]
    assert messages[0].startswith("selection: 1 non-finite scores (NaN/Inf) in the global batch")


# ----------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("gamma,n,want", [(0.6, 5, 3), (0.1, 10, 1), (0.7, 10, 7), (0.3, 10, 3),
                                          (0.6, 0, 0), (0.6, 1, 1), (0.5, 3, 2), (1.0, 7, 7),
                                          (0.0, 7, 0), (0.6, 10**9, 6 * 10**8)])
def test_keep_count(gamma, n, want):
    assert keep_count(gamma, n) == want


def test_keep_count_matches_exact_arithmetic():
    for i in range(101):
        for n in range(1, 120):
            assert keep_count(i / 100, n) == math.ceil(Fraction(i, 100) * n)
    assert keep_count(Fraction(1, 3), 7) == 3
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            keep_count(bad, 3)


def test_select_by_score():
    scores, valid = make_case("dups", 1, 2, 20, seed=2)
    mask, stats = select_by_score(scores[:, 0], valid[:, 0], 0.6)
    check([mask], [stats], scores, valid, keep_count(0.6, int(valid.sum())))


def test_select_random_is_reproducible_exact_and_roughly_uniform():
    valid = torch.rand(2, 50, generator=torch.Generator().manual_seed(0)) < 0.8
    k = keep_count(0.6, int(valid.sum()))
    first, stats = select_random(valid, 0.6, seed=1, step=3)
    assert torch.equal(first, select_random(valid, 0.6, seed=1, step=3)[0])
    assert not torch.equal(first, select_random(valid, 0.6, seed=1, step=4)[0])
    assert not torch.equal(first, select_random(valid, 0.6, seed=2, step=3)[0])
    assert stats.n_selected == int(first.sum()) == k and not (first & ~valid).any()
    rate = sum(select_random(valid, 0.6, 1, step)[0].float() for step in range(200)) / 200
    assert ((rate[valid] - 0.6).abs() < 0.15).all()


def _global_valid(m: int, n: int):
    return torch.rand(m, 2, n, generator=torch.Generator().manual_seed(m)) < 0.8


def _rank_strategies(rank, world, configs):
    out = []
    for m, n, seed, step in configs:
        out.append(select_random(_global_valid(m, n)[:, rank], 0.6, seed, step)[0].tolist())
    scores, valid = make_case("dups", world, 2, 9, seed=4)
    mask, stats = select_by_score(scores[:, rank], valid[:, rank], 0.6)
    n_valid = all_reduce_sum([float(valid[:, rank].sum())])[0]
    return out, (mask.tolist(), stats), n_valid, all_reduce_sum([rank + 0.5])[0], sum(all_reduce_sum([rank, 1.0]))


def test_strategies_on_two_ranks_match_one_rank():
    configs = [(1, 10, 1, 0), (2, 10, 1, 7), (2, 33, 9, 2)]
    per_rank = run_distributed(_rank_strategies, 2, args=(configs,))
    for i, (m, n, seed, step) in enumerate(configs):
        valid = _global_valid(m, n)
        one_rank, _ = select_random(valid.reshape(m, 2 * n), 0.6, seed, step)
        two_ranks = torch.cat([torch.tensor(r[0][i]) for r in per_rank], dim=1)
        assert torch.equal(one_rank, two_ranks)
    scores, valid = make_case("dups", 2, 2, 9, seed=4)
    by_score = [r[1] for r in per_rank]
    check([torch.tensor(b[0]) for b in by_score], [b[1] for b in by_score], scores, valid,
          keep_count(0.6, int(valid.sum())))
    assert all(r[2] == int(valid.sum()) for r in per_rank)
    assert [r[3] for r in per_rank] == [2.0, 2.0] and [r[4] for r in per_rank] == [3.0, 3.0]


def test_all_reduce_sum_in_a_world_of_one():
    assert all_reduce_sum([2.5]) == [2.5] and all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]


def test_frank_wolfe_weights():
    mask = torch.tensor([True, False, False, True])
    valid = torch.tensor([True, True, False, True])
    assert torch.allclose(frank_wolfe_weights(mask, valid, 0.6, 0.5), torch.tensor([0.8, 0.3, 0, 0.8]))
    assert torch.equal(frank_wolfe_weights(mask, valid, 0.6, 1.0), mask.float())
    assert torch.allclose(frank_wolfe_weights(mask, valid, 0.6, 0.0), torch.tensor([0.6, 0.6, 0, 0.6]))


def test_masked_mean_loss_scale_gives_the_global_weighted_mean():
    world, m = 3, 2
    losses = torch.rand(world, m, 2, 5, requires_grad=True)
    weights = (torch.rand(world, m, 10) < 0.6).float() * torch.rand(world, m, 10)
    total = float(weights.sum())
    per_rank = [sum(masked_mean_loss_scale(list(losses[r]), weights[r], total, world))
                for r in range(world)]
    got = sum(per_rank) / world  # DeepSpeed: sum over micro-batches, average over ranks
    want = (losses * weights.view(world, m, 2, 5)).sum() / total
    assert torch.allclose(got, want)
    (grad_got,) = torch.autograd.grad(got, losses)
    (grad_want,) = torch.autograd.grad(want, losses)
    assert torch.allclose(grad_got, grad_want)


def test_masked_mean_loss_scale_with_nothing_selected():
    losses = [torch.rand(2, 3, requires_grad=True)]
    (out,) = masked_mean_loss_scale(losses, torch.zeros(1, 6), 0.0, 2)
    out.backward()
    assert out.item() == 0.0 and torch.equal(losses[0].grad, torch.zeros(2, 3))


# ----------------------------------------------------------------------------- random tie-break


def tie_reference(scores, valid, gamma, seed, step):
    """Single-process truth with tie keys: sort by score, then tie key (both descending), then position."""
    from blade.train.selection import _generator_seed

    gen = torch.Generator().manual_seed(_generator_seed(seed, step))
    keys = torch.randint(0, 1 << 32, scores.shape, generator=gen).flatten()
    idx = valid.flatten().nonzero().squeeze(1)
    order = torch.sort(keys[idx], descending=True, stable=True).indices
    order = order[torch.sort(scores.flatten()[idx][order].float(), descending=True, stable=True).indices]
    mask = torch.zeros(valid.numel(), dtype=torch.bool)
    mask[idx[order[:keep_count(gamma, len(idx))]]] = True
    return mask.view(valid.shape)


@pytest.mark.parametrize("kind", ["equal", "dups", "negzero", "random"])
def test_tie_break_is_exact_and_not_by_position(kind):
    scores, valid = make_case(kind, 1, 2, 300, seed=5)
    mask, stats = select_by_score(scores[:, 0], valid[:, 0], 0.4, tie_seed=(3, 7))
    assert torch.equal(mask, tie_reference(scores, valid, 0.4, 3, 7)[:, 0])
    assert stats.n_selected == int(mask.sum()) == keep_count(0.4, int(valid.sum()))
    if kind == "equal":  # all scores tied: not the first positions, and no drift towards them
        first_k = global_topk_mask(scores[:, 0], valid[:, 0], stats.n_selected)[0]
        assert not torch.equal(mask, first_k)
        rate = sum(select_by_score(scores[:, 0], valid[:, 0], 0.4, tie_seed=(3, s))[0].float()
                   for s in range(100)) / 100
        half = valid.shape[-1] // 2
        early, late = rate[..., :half][valid[:, 0, :half]].mean(), rate[..., half:][valid[:, 0, half:]].mean()
        assert abs(float(early) - float(late)) < 0.05


def _tie_on_ranks(rank, world, kind):
    scores, valid = make_case(kind, world, 2, 40, seed=9)
    return select_by_score(scores[:, rank], valid[:, rank], 0.5, tie_seed=(4, 11))[0].tolist()


@pytest.mark.parametrize("kind", ["equal", "dups"])
def test_tie_break_is_the_same_on_one_and_two_ranks(kind):
    scores, valid = make_case(kind, 2, 2, 40, seed=9)
    one = select_by_score(scores.reshape(2, 80), valid.reshape(2, 80), 0.5, tie_seed=(4, 11))[0]
    two = torch.stack([torch.tensor(m) for m in run_distributed(_tie_on_ranks, 2, args=(kind,))], dim=1)
    assert torch.equal(one, two.reshape(2, 80))
    assert torch.equal(two, tie_reference(scores, valid, 0.5, 4, 11))
