"""blade.train.step: the guards around the step (non-finite reference losses, ZeRO-0 fp32 gradient
norms) and the one scoring mode, end to end on gloo ranks with the test-only fault hook."""
import math

import pytest
import torch

from blade.config import ModelConfig
from blade.model.transformer import Transformer
from blade.runtime import faults
from blade.train import engines
from tests.test_loop import run


def test_non_finite_reference_losses_are_skipped_and_counted(tmp_path, builtin_data, monkeypatch):
    """NaN reference losses in step 1 skip that step; in the reference phase before step 3 they leave
    both pool batches unscored and both reference steps unapplied: counted, and the run goes on."""
    monkeypatch.setenv(faults.ENV, "nan_ref_loss@train_step:1,nan_ref_loss@ref_phase:3")
    train, records, summary = run(tmp_path, builtin_data, "run", 2, "train.steps=5", "selection.tau=3",
                                  "selection.k_ref_steps=2", "train.eval_interval=0")
    skips = [r for r in records if r["kind"] == "skip"]
    assert [(r["step"], r["reason"]) for r in skips] == [(1, "512 non-finite reference token losses")]
    assert [r["step"] for r in train] == [0, 2, 3, 4]
    refs = [r for r in records if r["kind"] == "ref"]
    assert [(r["step"], r["ref_nonfinite_skipped"]) for r in refs] == [(0, 0), (3, 4)]
    assert refs[1]["ref_final_loss"] == "nan" and math.isfinite(refs[0]["ref_final_loss"])
    assert summary["kind"] == "summary" and all(math.isfinite(r["loss"]) for r in train)


def test_zero0_fp32_reports_the_gradient_norm(tmp_path, builtin_data):
    """DeepSpeed keeps no norm at stage 0 in fp32: blade computes it, and it is ZeRO-2's."""
    args = ("selection.strategy=full", "train.steps=3", "train.eval_interval=0")
    z0 = run(tmp_path, builtin_data, "z0", 2, *args, "deepspeed.zero_stage=0")[0]
    z2 = run(tmp_path, builtin_data, "z2", 2, *args, "deepspeed.zero_stage=2")[0]
    assert [r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4) for r, s in zip(z0, z2)] == [True] * 3


def test_zero0_fp32_stops_before_applying_a_non_finite_gradient(tmp_path, builtin_data, monkeypatch):
    monkeypatch.setenv(faults.ENV, "nan_grad@train_step:1")
    with pytest.raises(RuntimeError, match="step 1: non-finite gradient norm; ZeRO stage 0 in fp32"):
        run(tmp_path, builtin_data, "z0", 2, "selection.strategy=full", "train.steps=3",
            "train.eval_interval=0", "deepspeed.zero_stage=0")


class _Engine(torch.nn.Module):
    """What engines.per_token_loss needs of a DeepSpeed engine."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, inputs, targets):
        return self.module(inputs, targets)

    def zero_optimization_stage(self):
        return 0


def test_the_proxy_scores_in_train_mode_and_the_rest_in_eval_mode():
    torch.manual_seed(0)
    engine = _Engine(Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                             ffn_hidden=64, max_seq_len=16, dropout=0.5)))
    x = torch.randint(0, 64, (2, 16))
    engine.train()
    scored = [engines.per_token_loss(engine, x, x, grad=False, train_mode=True) for _ in range(2)]
    assert not torch.equal(*scored) and engine.module.training  # dropout on, as in the update
    evaluated = [engines.per_token_loss(engine, x, x, grad=False) for _ in range(2)]
    assert torch.equal(*evaluated) and engine.module.training  # eval mode inside, mode restored


def _count_forwards(rank, world, runs):
    """Forwards of each engine in one proxy step (the reference phase before it is not counted)."""
    from blade.config import load_config
    from blade.runtime.dist import World
    from blade.train import schedule
    from blade.train.loop import Trainer
    from tests.conftest import TINY

    out = []
    for overrides in runs:
        tr = Trainer(load_config(TINY, overrides), World(rank, world, rank, "cpu"))
        if schedule.reference_phase_before(tr.cfg.selection, 0):
            tr.stepper.reference_phase(0)
        counts = {"proxy": 0, "reference": 0}
        for name, engine in tr.engines.by_name().items():
            engine.module.register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
        tr.stepper.train_step(0)
        out.append(counts)
    return out


def test_forward_count_per_strategy_matches_the_flop_model(tmp_path, builtin_data):
    """full and random never run a scoring forward; rho1 and blade reuse it without accumulation and
    pay one extra proxy forward with it. flops.step_flops counts exactly these."""
    from blade.config import load_config
    from blade.model import flops
    from tests.conftest import TINY, tiny_overrides
    from tests.dist_harness import run_distributed

    cases = [(s, ga) for ga in (1, 2) for s in ("full", "random", "rho1", "blade")]
    runs = [tiny_overrides(builtin_data, str(tmp_path / f"{s}{ga}"), f"selection.strategy={s}",
                           f"train.grad_accum={ga}", "selection.k_ref_steps=1", "selection.rho1_ref_steps=1")
            for s, ga in cases]
    got = run_distributed(_count_forwards, 1, deepspeed=True, args=(runs,))[0]
    for (strategy, ga), overrides, counts in zip(cases, runs, got):
        cfg = load_config(TINY, overrides)
        f, fwd = flops.step_flops(cfg, 1, 64, strategy), flops.forward_flops(cfg.model, 4 * ga, 64)
        assert counts["proxy"] == ga * (1 + f.proxy_rescore / fwd), (strategy, ga, counts)
        assert counts["reference"] == ga * f.reference_forward / fwd, (strategy, ga, counts)
        scored = strategy in ("rho1", "blade")
        assert counts == {"proxy": ga * (2 if scored and ga > 1 else 1), "reference": ga if scored else 0}
