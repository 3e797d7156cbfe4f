"""blade/model/plan.py: the activation count on fake tensors equals the real one, the parts of a plan
follow the ZeRO accounting, the largest micro-batch is the boundary of the budget, and `blade plan`."""
import dataclasses

import pytest
import torch

from blade.cli import main
from blade.config import load_config
from blade.model import memory, plan
from blade.model.transformer import Transformer
from tests.conftest import TINY


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "full", "every_n"])
def test_fake_tensor_count_equals_the_real_forward(mode, precision):
    cfg = load_config(TINY, [f"model.activation_checkpointing={mode}", "model.n_layers=3"])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(dtype).train()
    tokens = torch.randint(0, cfg.model.vocab_size, (3, 33))
    real = plan.saved_activation_bytes(model, tokens[:, :-1], tokens[:, 1:])
    fake = plan.activation_bytes(cfg.model, 3, 32, precision)
    assert abs(fake - real) <= 0.01 * real, (fake, real)
    if mode != "none":  # checkpointing must show up in the count
        assert fake < 0.8 * plan.activation_bytes(dataclasses.replace(cfg.model, activation_checkpointing="none"),
                                                  3, 32, precision)


def _cfg(*extra):
    return load_config(TINY, [*extra])


def test_plan_parts_follow_the_zero_accounting():
    P = memory.param_count(_cfg().model)
    full = plan.plan(_cfg("selection.strategy=full", "deepspeed.zero_stage=3"), 4, gpu=False)
    blade = plan.plan(_cfg("selection.strategy=blade", "deepspeed.zero_stage=3"), 4, gpu=False)
    assert full.proxy_state == blade.proxy_state == memory.state_bytes_per_rank(P, "fp32", 3, 4)
    assert full.reference_weights == full.reference_phase == 0
    assert blade.reference_weights == 4 * P / 4  # fp32 weights only, between phases
    assert blade.reference_phase == memory.state_bytes_per_rank(P, "fp32", 3, 4) - P + blade.reduce_bucket
    assert full.reduce_bucket == 4 * P  # CPU: at most P elements of the 5e8 bucket are touched
    gpu = plan.plan(_cfg("selection.strategy=full", "deepspeed.zero_stage=3"), 4, gpu=True)
    assert gpu.reduce_bucket == 4 * plan.ZERO_DEFAULTS["reduce_bucket_size"]
    assert blade.peak == blade.state + blade.transient + blade.reference_phase
    # below stage 3 the reference keeps its training state: no phase adds to it
    two = plan.plan(_cfg("selection.strategy=rho1", "deepspeed.zero_stage=2"), 4)
    assert two.reference_weights == memory.state_bytes_per_rank(P, "fp32", 2, 4)
    assert two.reference_phase == two.reduce_bucket == two.gathered == 0
    # the reference's precision
    bf = plan.plan(_cfg("selection.strategy=blade", "selection.ref_precision=bf16"), 4)
    assert bf.reference_weights == 2 * P / 4


def test_a_step_holds_the_forward_or_the_optimizer_temporaries_not_both():
    """By the optimizer step the activations and gathered weights are freed (docs/benchmarks/
    cpu-2core_2026-12-03b.md): the step's transient is the higher part, whichever it is."""
    for micro, seq, ranks, larger in ((1, 8, 1, "optimizer_step"), (64, 64, 2, "forward")):
        p = plan.plan(_cfg("deepspeed.zero_stage=2", f"train.micro_batch_size={micro}"), ranks, seq, gpu=False)
        assert p.forward == p.activations + p.head + p.gathered
        other = "forward" if larger == "optimizer_step" else "optimizer_step"
        assert getattr(p, larger) > getattr(p, other) > 0
        assert p.transient == getattr(p, larger) and p.step_peak == p.state + getattr(p, larger)


def test_largest_micro_batch_is_the_budget_boundary():
    cfg = _cfg("selection.strategy=blade")
    at = lambda b: plan.plan(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=b)),  # noqa: E731
                             2, 64, gpu=False).peak
    budget = (at(5) + at(6)) / 2
    assert plan.largest_micro_batch(cfg, 2, budget, 64, gpu=False) == 5
    assert plan.largest_micro_batch(cfg, 2, at(1) - 1, 64, gpu=False) == 0


def test_cli_plan(capsys):
    assert main(["plan", "configs/tinyllama-1.1b.yaml", "--ranks", "8", "--memory-gib", "80",
                 "model.activation_checkpointing=full"]) == 0  # overrides may follow the flags
    out = capsys.readouterr().out
    assert "1,100,048,384 parameters" in out and "checkpointing full" in out
    assert "fits in 80.0 GiB; largest micro-batch that fits:" in out
    assert main(["plan", "configs/quickstart.yaml", "--ranks", "0"]) == 2
    assert capsys.readouterr().err.strip() == "blade: error: plan --ranks must be >= 1, got 0"
