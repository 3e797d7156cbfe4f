"""End-to-end training on gloo ranks, always against a single-process run of the same global batch."""
import os

import pytest

from blade.runtime.metrics import read_metrics
from tests.conftest import TINY, tiny_overrides
from tests.dist_harness import run_distributed

# fp32 losses of runs that differ only in how the global batch is split over ranks: the gradient
# sums are added in another order (per-rank partial sums, then the all-reduce), which changes the
# last bits (~1e-7 relative) of each step; Adam carries that through a few steps. 1e-5 relative
# is two orders above what we measure and far below any real bug (a wrong normalisation is >1e-2).
RTOL = 1e-5


def _fit(rank, world, overrides):
    from blade.config import load_config
    from blade.runtime.dist import World
    from blade.train.loop import Trainer

    cfg = load_config(TINY, overrides)
    return Trainer(cfg, World(rank, world, rank, "cpu")).fit()


def run(tmp_path, data, name, world, *extra):
    run_dir = str(tmp_path / name)
    summary = run_distributed(_fit, world, args=(tiny_overrides(data, run_dir, *extra),), deepspeed=True)[0]
    records = read_metrics(run_dir)
    return [r for r in records if r["kind"] == "train"], records, summary


def assert_same_losses(a, b, rtol=RTOL):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra["n_selected"] == rb["n_selected"] and ra["n_valid"] == rb["n_valid"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=rtol), (ra["step"], ra["loss"], rb["loss"])


def test_two_ranks_equal_one_process_full(tmp_path, builtin_data):
    one, _, _ = run(tmp_path, builtin_data, "one", 1, "selection.strategy=full", "train.micro_batch_size=8",
                    "train.steps=6")
    two, records, _ = run(tmp_path, builtin_data, "two", 2, "selection.strategy=full",
                          "train.micro_batch_size=4", "train.steps=6")
    assert_same_losses(one, two)
    assert one[-1]["loss"] < one[0]["loss"]
    assert two[-1]["tokens_seen"] == 6 * 8 * 64 and two[-1]["tokens_trained"] == two[-1]["tokens_seen"]
    assert any(r["kind"] == "eval" and "val_loss" in r for r in records)
    assert os.path.exists(tmp_path / "two" / "config.yaml")


def _val_loss(rank, world, overrides):
    from blade.config import load_config
    from blade.runtime.dist import World
    from blade.train.loop import Trainer

    return Trainer(load_config(TINY, overrides), World(rank, world, rank, "cpu")).evaluate(0)


def test_val_loss_is_the_same_on_any_world_size_and_micro_batch(tmp_path, builtin_data):
    """The validation set is every sequence of data.val once, whatever the batch layout."""
    losses = [run_distributed(_val_loss, world, deepspeed=True, args=(tiny_overrides(
        builtin_data, str(tmp_path / f"w{world}m{micro}"), "selection.strategy=full",
        f"train.micro_batch_size={micro}", "train.eval_sequences=0"),))[0]
        for world, micro in ((1, 8), (2, 3), (4, 2))]
    assert losses[0] > 1.0 and losses[1:] == pytest.approx(losses[:1] * 2, rel=1e-6)


def test_activation_checkpointing_changes_no_number_under_zero3(tmp_path, builtin_data):
    """blade with dropout and accumulation on 2 ranks: recomputing every block in the backward (the
    ZeRO-3 hooks gather the parameters again) gives bitwise the same losses and gradient norms."""
    args = ("train.steps=4", "selection.tau=2", "selection.k_ref_steps=1", "model.dropout=0.1",
            "train.grad_accum=2", "train.micro_batch_size=2", "train.eval_interval=0")
    plain, _, _ = run(tmp_path, builtin_data, "plain", 2, *args)
    ac, _, _ = run(tmp_path, builtin_data, "ac", 2, *args, "model.activation_checkpointing=full")
    assert [(r["loss"], r["grad_norm"], r["n_selected"]) for r in plain] == \
        [(r["loss"], r["grad_norm"], r["n_selected"]) for r in ac]


def test_zero_stages_agree(tmp_path, builtin_data):
    losses = {}
    for stage in (0, 1, 2, 3):
        train, _, _ = run(tmp_path, builtin_data, f"z{stage}", 2, "selection.strategy=full", "train.steps=4",
                          f"deepspeed.zero_stage={stage}")
        losses[stage] = train
    for stage in (0, 1, 2):
        assert_same_losses(losses[stage], losses[3])


def test_blade_one_vs_two_ranks_with_accumulation(tmp_path, builtin_data):
    """BLADE with syncs and reference phases: 1 rank x 2 accumulation micro-batches == 2 ranks x 1."""
    common = ("selection.strategy=blade", "selection.tau=3", "selection.k_ref_steps=2", "train.steps=7",
              "train.micro_batch_size=4", "selection.diag_interval=3")
    one, _, one_summary = run(tmp_path, builtin_data, "one", 1, *common, "train.grad_accum=2")
    two, records, summary = run(tmp_path, builtin_data, "two", 2, *common)
    assert_same_losses(one, two, rtol=1e-4)
    for key in ("by_label", "by_source"):  # counts exact; mean proxy losses and scores to rounding
        for name, a in one_summary[key].items():
            b = summary[key][name]
            assert (a["selected"], a["total"]) == (b["selected"], b["total"]), (key, name)
            for stat in ("proxy_loss", "score"):
                assert (a[stat] is None) == (b[stat] is None) and (
                    a[stat] is None or a[stat] == pytest.approx(b[stat], rel=1e-4, abs=1e-5)), (name, stat)
    for r in two:
        assert r["n_selected"] == -(-6 * r["n_valid"] // 10)  # ceil(0.6 * n_valid), exactly
        assert r["topk_rounds"] <= 6
    refs = [r for r in records if r["kind"] == "ref"]
    assert [r["step"] for r in refs] == [0, 3, 6]
    assert any("dist_u_w" in r for r in two)
    assert summary["tokens_trained"] == sum(r["n_selected"] for r in two)


@pytest.mark.parametrize("strategy", ["random", "rho1"])
def test_other_strategies_run_and_match_across_world_sizes(tmp_path, builtin_data, strategy):
    common = (f"selection.strategy={strategy}", "selection.rho1_ref_steps=3", "train.steps=4",
              "train.micro_batch_size=4")
    one, _, _ = run(tmp_path, builtin_data, "one", 1, *common, "train.grad_accum=2")
    two, records, _ = run(tmp_path, builtin_data, "two", 2, *common)
    assert_same_losses(one, two, rtol=1e-4)
    refs = [r for r in records if r["kind"] == "ref"]
    assert len(refs) == (1 if strategy == "rho1" else 0)
