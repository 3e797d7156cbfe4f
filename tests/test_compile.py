"""`train.compile`: compiled blocks train like eager ones (within a stated tolerance), through DeepSpeed
ZeRO-3 and with unchanged parameter names; a machine that cannot compile is a one-line config error."""
import pytest
import torch

from blade.cli import main
from blade.config import load_config
from blade.errors import ConfigError
from blade.model import compile as model_compile
from tests.conftest import TINY, tiny_overrides
from tests.dist_harness import run_distributed


def _engine_losses_and_grads(rank, world_size, compiled):
    from deepspeed.utils import safe_get_full_grad

    from blade.train.engines import build_engine

    cfg = load_config(TINY, ["model.vocab_size=512", "deepspeed.zero_stage=3", f"train.compile={compiled}"])
    engine = build_engine(cfg, world_size, seed=1234, schedule=False)
    g = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(0, 512, (4, 64), generator=g) for _ in range(2))
    weights = torch.rand(4, 64, generator=g)
    out = []
    for _ in range(2):  # the second step runs on the weights the first one updated
        loss = engine(tokens, targets)
        engine.backward((loss * weights).sum() / weights.sum())
        grads = {n: safe_get_full_grad(p).numpy().copy() for n, p in engine.module.named_parameters()}
        engine.step()
        out.append((loss.detach().numpy().copy(), grads))  # numpy: pickled by value
    return out, [type(b).__name__ for b in engine.module.layers], engine.module.layers[0]._compiled_call_impl is not None


def test_compiled_blocks_match_eager_under_zero3():
    """Tolerance: 1e-5 absolute on fp32 per-token losses and gradients (inductor fuses the
    element-wise ops and reorders reductions; observed differences are ~1e-6 on losses, ~1e-9 on
    gradients)."""
    (eager, _, eager_compiled), = run_distributed(_engine_losses_and_grads, 1, args=(False,), deepspeed=True,
                                                  timeout=300)
    (comp, kinds, is_compiled), = run_distributed(_engine_losses_and_grads, 1, args=(True,), deepspeed=True,
                                                  timeout=300)
    assert is_compiled and not eager_compiled and kinds == ["Block", "Block"]  # in place: names unchanged
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, comp):
        torch.testing.assert_close(torch.from_numpy(loss_c), torch.from_numpy(loss_e), atol=1e-5, rtol=0)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(torch.from_numpy(grads_c[name]), torch.from_numpy(grads_e[name]),
                                       atol=1e-5, rtol=1e-4, msg=name)


def test_no_compiler_is_a_one_line_config_error(capsys, builtin_data, tmp_path):
    import torch._inductor.config as inductor_config

    assert load_config(TINY, ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="train.compile must be true or false"):
        load_config(TINY, ["train.compile=yes please"])
    model_compile.check_compile("cpu")  # this machine has g++
    args = ["train", TINY, *tiny_overrides(builtin_data, str(tmp_path / "r")), "train.compile=true", "--dry-run"]
    with inductor_config.patch({"cpp.cxx": (None, "no-such-c++-compiler")}):
        with pytest.raises(ConfigError, match="needs a C.. compiler"):
            model_compile.check_compile("cpu")
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.compile=true needs a C++ compiler" in err[0]
    assert main(args) == 0 and "compile: true" in capsys.readouterr().out
