"""blade/model/memory.py: parameter count by formula, model state per ZeRO stage, and the dry run's
stage advice."""
import pytest

from blade.cli import main
from blade.config import load_config
from blade.model import memory
from blade.model.transformer import Transformer
from tests.conftest import TINY, tiny_overrides


@pytest.mark.parametrize("overrides", [[], ["model.tie_embeddings=false"], ["model.n_kv_heads=4"],
                                       ["model.n_kv_heads=1", "model.ffn_hidden=100", "model.n_layers=3"],
                                       ["model.qkv_bias=true"]])
def test_param_count_equals_the_model(overrides):
    m = load_config(TINY, overrides).model
    assert memory.param_count(m) == Transformer(m).num_params()


def test_state_bytes_by_stage():
    P, N = 1000, 4
    # bf16: 2 (weights) + 2 (grads) + 12 (fp32 master + 2 moments) bytes per parameter
    assert memory.state_bytes_per_rank(P, "bf16", 0, N) == 16 * P
    assert memory.state_bytes_per_rank(P, "bf16", 1, N) == 4 * P + 12 * P / N
    assert memory.state_bytes_per_rank(P, "bf16", 2, N) == 2 * P + 14 * P / N
    assert memory.state_bytes_per_rank(P, "bf16", 3, N) == 16 * P / N
    assert memory.state_bytes_per_rank(P, "fp32", 0, N) == 20 * P
    cfg = load_config(TINY, ["selection.strategy=full", "train.precision=bf16"])
    blade = load_config(TINY, ["selection.strategy=blade", "train.precision=bf16"])
    mixed = load_config(TINY, ["selection.strategy=blade", "selection.ref_precision=bf16"])
    P = memory.param_count(cfg.model)
    assert memory.model_state_bytes(cfg, 2, N) == memory.state_bytes_per_rank(P, "bf16", 2, N)
    assert memory.model_state_bytes(blade, 2, N) == 2 * memory.model_state_bytes(cfg, 2, N)  # + reference
    assert memory.model_state_bytes(mixed, 3, N) == (20 + 16) * P / N


def test_advice_follows_the_budget():
    cfg = load_config(TINY, ["train.precision=bf16", "deepspeed.zero_stage=3"])
    state = {s: memory.model_state_bytes(cfg, s, 2) for s in range(4)}
    roomy = memory.describe_memory(cfg, 2, budget_bytes=state[0] / memory.FIT_SHARE * 1.01)
    assert "the weights fit unsharded (ZeRO-2" in roomy and "set deepspeed.zero_stage=2" in roomy
    tight = memory.describe_memory(cfg, 2, budget_bytes=(state[3] + state[2]) / 2 / memory.FIT_SHARE)
    assert "ZeRO-3 is needed" in tight
    none = memory.describe_memory(cfg, 2, budget_bytes=state[3] / memory.FIT_SHARE * 0.99)
    assert "does not fit even at ZeRO-3" in none
    at2 = load_config(TINY, ["train.precision=bf16", "deepspeed.zero_stage=2"])
    assert "ZeRO-2 fits" in memory.describe_memory(at2, 2, budget_bytes=state[0] * 10)
    assert "ZeRO-2 does not fit" in memory.describe_memory(at2, 2, budget_bytes=state[3] / memory.FIT_SHARE)


def test_dry_run_prints_the_advice(builtin_data, tmp_path, capsys):
    args = ["train", TINY, *tiny_overrides(builtin_data, str(tmp_path / "r")), "--dry-run"]
    assert main(args + ["--memory-gib", "16"]) == 0
    out = capsys.readouterr().out
    assert "memory:" in out and "16.0 GiB per rank (--memory-gib)" in out
    assert "zero:     the weights fit unsharded (ZeRO-2" in out
    assert main(args) == 0 and "GiB per rank (RAM / 1 local rank)" in capsys.readouterr().out
