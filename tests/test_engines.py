"""Twin DeepSpeed engines: derived DeepSpeed config, reference sync by local partition copy, Dist(u, w),
and the proxy's ZeRO-3 gradient against a single-process plain-torch gradient."""
import math

import pytest
import torch

from blade.config import load_config
from blade.runtime import zero
from blade.train import engines
from tests.conftest import TINY
from tests.dist_harness import run_distributed

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single",
               "reduce", "barrier", "send", "recv", "isend", "irecv")


def _cfg(*overrides):
    return load_config(TINY, ["model.vocab_size=64", "model.dim=32", "model.ffn_hidden=64",
                              "model.max_seq_len=16", "train.micro_batch_size=2", *overrides])


def test_deepspeed_config_is_derived():
    cfg = _cfg("train.grad_accum=3", "train.precision=bf16", "deepspeed.zero_stage=2",
               "deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}, wall_clock_breakdown: true}")
    ds = engines.deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["optimizer"]["params"]["torch_adam"] is True and "fused" not in ds["optimizer"]["params"]
    assert engines.deepspeed_config(_cfg("optim.fused=true"), 1)["optimizer"]["params"]["fused"] is True
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # escape hatch, merged deep
    assert ds["zero_optimization"]["contiguous_gradients"] is True
    assert ds["wall_clock_breakdown"] is True


def test_lr_schedule():
    cfg = _cfg("optim.lr=1.0", "optim.warmup_steps=4", "optim.min_lr_ratio=0.1", "train.steps=14")
    assert [engines.lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert engines.lr_at(cfg, 4) == pytest.approx(1.0)
    assert engines.lr_at(cfg, 9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert engines.lr_at(cfg, 14) == pytest.approx(0.1)


def _batch(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, 16), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, 16), generator=g)
    return x, y


def _gathered(engine):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return [p.detach().clone() for p in engine.module.parameters()]


def _sync_case(rank, world, stage, precision, *extra):
    import torch.distributed as dist

    cfg = _cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}", *extra)
    P = engines.build_engine(cfg, world, seed=1, schedule=True)
    R = engines.build_engine(cfg, world, seed=2, schedule=False)   # different init: sync must fix it
    for step in range(2):  # both have optimizer state and left-over gathered params
        for engine in (P, R):
            x, y = _batch(cfg, 10 * step + rank)
            engine.backward(engine(x, y).mean())
            engine.step()
        with torch.no_grad():
            R(*_batch(cfg, 99))
    calls = []
    originals = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
    for n, fn in originals.items():
        setattr(dist, n, lambda *a, _n=n, _fn=fn, **k: (calls.append(_n), _fn(*a, **k))[1])
    try:
        engines.sync_reference(P, R)
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
    moments_zero = all(float(v.abs().sum()) == 0 for s in zero.base_optimizer(R).state.values()
                       for v in s.values() if torch.is_tensor(v))
    equal_after_sync = all(torch.equal(a, b) for a, b in zip(_gathered(P), _gathered(R)))
    dist_after_sync = engines.relative_distance(P, R, world)
    engines.set_lr(R, 0.0)   # the stale-master trap: a step must not bring the old weights back
    x, y = _batch(cfg, 7 + rank)
    R.backward(R(x, y).mean())
    R.step()
    equal_after_step = all(torch.equal(a, b) for a, b in zip(_gathered(P), _gathered(R)))
    return calls, moments_zero, equal_after_sync, equal_after_step, dist_after_sync


@pytest.mark.parametrize("stage,precision,extra", [(3, "fp32", ()), (3, "bf16", ()), (2, "fp32", ()),
                                                   (1, "fp32", ()), (0, "fp32", ()), (0, "bf16", ()),
                                                   (2, "bf16", ("optim.fused=true",))])
def test_sync_copies_local_partitions_exactly(stage, precision, extra):
    for calls, moments_zero, after_sync, after_step, d in run_distributed(
            _sync_case, 2, args=(stage, precision, *extra), deepspeed=True):
        assert calls == [], f"sync used collectives: {calls}"
        assert moments_zero
        assert after_sync and d == 0.0
        assert after_step


def _fused_case(rank, world, stage):
    """Weights after two steps with the fused AdamW kernel and with torch's loop, from the same init."""
    out = []
    for fused in (False, True):
        cfg = _cfg(f"deepspeed.zero_stage={stage}", f"optim.fused={fused}", "optim.warmup_steps=0")
        engine = engines.build_engine(cfg, world, seed=1, schedule=True)
        kinds = [g.get("fused") for g in zero.base_optimizer(engine).param_groups]
        for step in range(2):
            x, y = _batch(cfg, 10 * step + rank)
            engine.backward(engine(x, y).mean())
            engine.step()
        out.append((kinds, [t.numpy().copy() for t in _gathered(engine)]))
    return out


@pytest.mark.parametrize("stage", [1, 3])
def test_fused_adamw_steps_like_the_loop(stage):
    """optim.fused=true reaches torch's AdamW (fused kernel) under ZeRO; after two steps the weights
    equal the loop's within 1e-6 (the kernel rounds differently: not bitwise)."""
    for (loop_kinds, loop), (fused_kinds, fused) in run_distributed(_fused_case, 2, args=(stage,),
                                                                    deepspeed=True):
        assert set(fused_kinds) == {True} and True not in loop_kinds
        for a, b in zip(loop, fused):
            torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), atol=1e-6, rtol=1e-5)


def _distance_case(rank, world):
    cfg = _cfg()
    P = engines.build_engine(cfg, world, seed=1, schedule=True)
    R = engines.build_engine(cfg, world, seed=2, schedule=False)
    u, w = _gathered(P), _gathered(R)
    expected = math.sqrt(sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(u, w))) / \
        math.sqrt(sum(float(a.double().pow(2).sum()) for a in u))
    return engines.relative_distance(P, R, world), expected


def test_relative_distance_matches_gathered():
    for got, expected in run_distributed(_distance_case, 2, deepspeed=True):
        assert got == pytest.approx(expected, rel=1e-9)


def _grad_case(rank, world, tie):
    """ZeRO-3 gradient of the global masked mean vs plain torch on the concatenated batch."""
    import deepspeed

    from blade.model.transformer import Transformer
    from blade.train import selection

    cfg = _cfg(f"model.tie_embeddings={str(tie).lower()}")
    P = engines.build_engine(cfg, world, seed=3, schedule=True)
    g = torch.Generator().manual_seed(5)
    B = cfg.train.micro_batch_size
    x = torch.randint(0, 64, (B * world, 16), generator=g)
    y = torch.randint(0, 64, (B * world, 16), generator=g)
    mask = torch.rand(B * world, 16, generator=g) < 0.6
    mine = slice(rank * B, (rank + 1) * B)
    lu = P(x[mine], y[mine])
    loss, = selection.masked_mean_loss_scale([lu], [mask[mine]], float(mask.sum()), world)
    P.backward(loss, scale_wrt_gas=False)
    ds_grads = [deepspeed.utils.safe_get_full_grad(p).clone() for p in P.module.parameters()]
    weights = _gathered(P)
    torch.manual_seed(0)
    ref = Transformer(cfg.model)
    with torch.no_grad():
        for p, w in zip(ref.parameters(), weights):
            p.copy_(w)
    ((ref(x, y) * mask).sum() / mask.sum()).backward()
    return [float((a - p.grad).abs().max()) for a, p in zip(ds_grads, ref.parameters())]


@pytest.mark.parametrize("tie", [True, False])
def test_zero3_gradient_equals_single_process(tie):
    for diffs in run_distributed(_grad_case, 2, args=(tie,), deepspeed=True):
        assert max(diffs) < 1e-6, diffs


def _release_case(rank, world, precision):
    cfg = _cfg("deepspeed.zero_stage=3", f"train.precision={precision}")
    P = engines.build_engine(cfg, world, seed=1, schedule=True)
    R = engines.build_engine(cfg, world, seed=2, schedule=False)
    for engine in (P, R):
        x, y = _batch(cfg, rank)
        engine.backward(engine(x, y).mean())
        engine.step()
    x, y = _batch(cfg, 50 + rank)
    before = engines.per_token_loss(R, x, y, grad=False)
    lp_bytes = sum(t.numel() * t.element_size() for t in zero.local_shards(R))
    master_bytes = sum(t.numel() * 4 for t in zero.master_partitions(R))
    freed = zero.release_training_state(R)
    scores_unchanged = torch.equal(engines.per_token_loss(R, x, y, grad=False), before)
    masters_empty = all(t.untyped_storage().nbytes() == 0 for t in zero.master_partitions(R))
    weights_kept = sum(t.untyped_storage().nbytes() for t in zero.local_shards(R)) >= lp_bytes
    with zero.weights_only_state(R):  # what a checkpoint of the released reference holds
        saved_state = len(zero.base_optimizer(R).state)
        saved_master = [t.clone() for t in zero.master_partitions(R)]
    lp = [t.float() for t in R.optimizer.fp16_partitioned_groups_flat]
    master_is_weights = all(torch.equal(m, w) for m, w in zip(saved_master, lp))
    released_again = all(t.untyped_storage().nbytes() == 0 for t in zero.master_partitions(R))
    engines.sync_reference(P, R)  # regrows, copies the master and the weights, zero moments
    engines.set_lr(R, 0.0)
    R.backward(R(x, y).mean())
    R.step()
    equal_after_step = all(torch.equal(a, b) for a, b in zip(_gathered(P), _gathered(R)))
    return (freed, master_bytes, scores_unchanged, masters_empty, weights_kept, saved_state, master_is_weights,
            released_again, equal_after_step)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_released_reference_scores_alike_saves_its_weights_and_syncs_back(precision):
    for (freed, master_bytes, scores_unchanged, masters_empty, weights_kept, saved_state, master_is_weights,
         released_again, equal_after_step) in run_distributed(_release_case, 2, args=(precision,), deepspeed=True):
        assert freed >= 3 * master_bytes  # the master, two AdamW moments, and the gradient buffers
        assert scores_unchanged and masters_empty and weights_kept
        assert saved_state == 0 and master_is_weights and released_again
        assert equal_after_step  # no stale master came back through the regrown storage


def _init_case(rank, world, precision, stage):
    cfg = _cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}")
    engine = engines.build_engine(cfg, world, seed=3, schedule=False)
    sharded = all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in engine.module.parameters())
    dtypes = {str(t.dtype) for t in zero.local_shards(engine)}
    weights = [w.float().flatten().tolist() for w in (_gathered(engine) if stage == 3 else
                                                       [p.detach() for p in engine.module.parameters()])]
    names = {id(p): n for n, p in engine.module.named_parameters()}
    decayed = sorted(names[id(p)] for g in engines.param_groups(engine.module, 0.1) if g["weight_decay"]
                     for p in g["params"])
    return weights, sharded, dtypes, decayed


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharded_construction_gives_the_plain_weights_on_any_world_size(precision):
    """ZeRO-3 builds under zero.Init (partitioned from the start); the gathered weights on 1, 2 and 4
    ranks are bitwise those of a plain (ZeRO-1, unpartitioned) build of the same seed."""
    plain, _, dtype, plain_decayed = run_distributed(_init_case, 1, args=(precision, 1), deepspeed=True)[0]
    assert plain_decayed and all(n.endswith("weight") and "norm" not in n for n in plain_decayed)
    for world in (1, 2, 4):
        for weights, sharded, dtypes, decayed in run_distributed(_init_case, world, args=(precision, 3),
                                                                 deepspeed=True):
            assert sharded and dtypes == dtype == {"torch.float32" if precision == "fp32" else "torch.bfloat16"}
            assert weights == plain
            assert decayed == plain_decayed  # weight decay reaches the matrices of a partitioned model too
