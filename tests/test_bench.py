"""`blade bench`: the report's arithmetic on made-up measurements, the collective counter, the phase
timer, and one tiny end-to-end run on 2 gloo ranks."""
import json
import math
import os
import subprocess
import time

import pytest

from blade.bench import probes as bench_probes
from blade.bench import report as bench_report
from blade.config import load_config
from blade.model import flops
from blade.runtime.timing import PhaseTimer
from tests.conftest import ROOT, TINY, tcmalloc_path, tiny_overrides
from tests.dist_harness import run_distributed


def _run(name, steps, n_valid, n_selected, phases=None, **kw):
    return bench_report.StrategyRun(name, step_s=list(steps), phases=phases or [{} for _ in steps],
                                    n_valid=[n_valid] * len(steps), n_selected=[n_selected] * len(steps), **kw)


def test_tokens_and_mfu_with_accumulation_and_ranks():
    """2 ranks x micro 4 x accumulation 2 x 64 tokens: 1024 tokens seen per optimizer step, whatever
    rank reports them; the slowest rank's time counts; blade amortises its reference phase over tau."""
    cfg = load_config(TINY, ["train.grad_accum=2", "selection.tau=10", "selection.k_ref_steps=3"])
    world, seq = 2, 64
    seen = bench_report.global_tokens_per_step(4, 2, world, seq)
    assert seen == 1024
    trained = math.ceil(0.6 * seen)
    ranks = [_run("blade", [1.0, 2.0, 3.0], seen, trained, ref_phase_s=5.0, state_bytes=10, step_peak_bytes=[4]),
             _run("blade", [1.5, 1.0, 3.5], seen, trained, ref_phase_s=4.0, state_bytes=12, step_peak_bytes=[1])]
    s = bench_report.summarize_strategy("blade", ranks, cfg, world, seq, peak=1e9)
    assert s["step_s"]["median"] == 2.0                   # per step: max over ranks = 1.5, 2.0, 3.5
    assert s["step_s"]["p10"] == pytest.approx(1.6) and s["step_s"]["p90"] == pytest.approx(3.2)
    assert s["amortised_step_s"] == pytest.approx(2.0 + 5.0 / 10)  # slowest rank's phase / tau
    assert s["tokens_seen_per_s"] == pytest.approx(1024 / 2.5)
    assert s["tokens_trained_per_s"] == pytest.approx(trained / 2.5)
    assert s["tokens_seen_per_s_steady"] == pytest.approx(1024 / 2.0)
    total = flops.step_flops(cfg, world, seq, "blade").total
    assert s["flops"]["total"] == total
    assert s["achieved_flops_per_device"] == pytest.approx(total / 2.5 / world)
    assert s["mfu"] == pytest.approx(s["achieved_flops_per_device"] / 1e9)
    assert s["memory"]["peak_bytes"] == 14 and s["memory"]["per_rank_peak_bytes"] == [14, 13]


def test_full_strategy_has_no_reference_terms_and_breakdown_adds_up():
    cfg = load_config(TINY, [])
    phases = [{"time_proxy_forward_s": 0.1, "time_backward_s": 0.2}] * 3
    s = bench_report.summarize_strategy("full", [_run("full", [0.5, 0.5, 0.5], 512, 512, phases=phases)],
                                        cfg, 1, 64, peak=2e9)
    assert s["amortised_step_s"] == 0.5 and s["kept_fraction"] == 1.0
    b = s["breakdown_s"]
    assert b["reference_phase"] == 0.0 and b["reference_forward"] == 0.0
    assert b["other"] == pytest.approx(0.2)
    assert sum(b.values()) == pytest.approx(s["step_s"]["mean"])
    achieved, util = bench_report.mfu(3e9, 0.5, 2, 4e9)
    assert achieved == 3e9 and util == 0.75


def test_checkpoint_rate_and_percentile():
    assert bench_report.checkpoints_per_step("full", 0, 40) == 0.0
    assert bench_report.checkpoints_per_step("blade", 0, 40) == 1 / 40
    assert bench_report.checkpoints_per_step("blade", 80, 40) == pytest.approx(1 / 40)  # every save coincides
    assert bench_report.checkpoints_per_step("random", 100, 40) == 1 / 100
    assert bench_report.percentile([3, 1, 2, 4], 50) == 2.5 and bench_report.percentile([7], 90) == 7


def test_targets_flag_a_slow_blade():
    cfg = load_config(TINY, ["selection.tau=10", "selection.k_ref_steps=2"])
    full = bench_report.summarize_strategy("full", [_run("full", [1.0] * 3, 512, 512)], cfg, 1, 64, 1e9)
    ok_step = bench_report.analytic_floor(cfg, 1, 64) - 0.2  # reference phase: 0.2 steps amortised
    blade = bench_report.summarize_strategy(
        "blade", [_run("blade", [ok_step] * 3, 512, 308, ref_phase_s=2.0, rounds=[2, 3],
                       ref_phase_parts={"sync": 0.001},
                       sync_collectives={"ops": 0, "bytes": 0, "names": []})], cfg, 1, 64, 1e9)
    result = {"strategies": {"full": full, "blade": blade},
              "analytic_floor": bench_report.analytic_floor(cfg, 1, 64),
              "max_rounds": 3, "loader": {"tokens_per_s": 1e6}}
    targets = {t["target"].split(":")[0].split(" <=")[0]: t for t in bench_report.check_targets(result)}
    assert targets["blade / full step time"]["passed"]
    assert targets["blade"]["passed"] and targets["reference sync"]["passed"]  # 0 ops, 1 ms of a 1 s step
    blade["step_s"]["median"] *= 1.2
    blade["amortised_step_s"] = blade["step_s"]["median"] + 0.2
    slow = {t["target"]: t for t in bench_report.check_targets(result)}
    assert not slow["blade / full step time <= 1.05 x analytic floor"]["passed"]
    assert "FLOPs predict" in slow["blade / full step time <= 1.05 x analytic floor"]["detail"]


def test_phase_timer_adds_up_repeated_blocks():
    timer = PhaseTimer()
    for _ in range(2):
        with timer("backward"):
            time.sleep(0.01)
    assert timer.get("backward") >= 0.02
    record = timer.record(("backward", "selection"))
    assert record["time_selection_s"] == 0.0 and record["time_backward_s"] == timer.get("backward")
    timer.reset()
    assert timer.record() == {}


def _count_case(rank, world):
    import torch
    import torch.distributed as dist

    x = torch.ones(10)
    with bench_probes.count_collectives() as found:
        dist.all_reduce(x)
        out = torch.empty(10 * world)
        dist.all_gather_into_tensor(out, x)
        y = x * 2  # not a collective
    with bench_probes.count_collectives() as none:
        y.add_(1)
    return found["ops"], found["bytes"], sorted(set(found["names"])), none["ops"]


def test_collective_counter_sees_every_c10d_op():
    """The zero-bytes claim for the sync is only as good as the counter: it must see real traffic."""
    for ops, nbytes, names, none in run_distributed(_count_case, 2):
        assert ops == 2 and none == 0
        assert nbytes == 40 + (80 + 40)  # all-reduce in place; all-gather output + input
        assert names == ["_allgather_base_", "allreduce_"]


@pytest.mark.slow
def _anchor_case(rank, world, cfg_overrides):
    """One step of the peer anchor; returns its rank's tokens and the weights after the step."""
    import torch

    from blade.bench.anchor import DDPAnchor

    cfg = load_config(TINY, cfg_overrides)
    anchor = DDPAnchor(cfg, rank, "cpu", 16)
    tokens = torch.randint(0, cfg.model.vocab_size, anchor.shape, generator=torch.Generator().manual_seed(rank))
    anchor.step()
    return tokens.tolist(), {k: v.tolist() for k, v in anchor.model.module.state_dict().items()}


def test_ddp_anchor_is_the_single_process_step_on_the_global_batch():
    """The anchor on 2 ranks takes the AdamW step of one process on both ranks' batches together (equal
    batches: the mean of per-rank mean losses is the global mean)."""
    import torch

    from blade.model.transformer import Transformer
    from blade.train.engines import param_groups

    overrides = ["model.vocab_size=512", "train.micro_batch_size=2"]
    ranks = run_distributed(_anchor_case, 2, args=(overrides,))
    cfg = load_config(TINY, overrides)
    o = cfg.optim
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    tokens = torch.tensor(ranks[0][0] + ranks[1][0])
    model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    opt.step()
    for name, value in model.state_dict().items():
        for _, weights in ranks:
            assert torch.allclose(torch.tensor(weights[name]), value, rtol=1e-5, atol=1e-6), name


def test_bench_end_to_end_two_ranks(tmp_path, builtin_data):
    out_dir = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    overrides = tiny_overrides(builtin_data, str(tmp_path / "unused"), "selection.tau=5", "selection.k_ref_steps=1")
    out = subprocess.run(["bash", "launch/local.sh", "2", "--cmd", "bench", "-c", TINY, *overrides,
                          "--strategies", "full,blade", "--warmup", "1", "--steps", "2", "--memory-steps", "1",
                          "--profile", "--anchor", "--out", str(out_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((out_dir / "bench.json").read_text())
    assert set(result["strategies"]) == {"full", "blade"} and result["meta"]["world_size"] == 2
    full, blade = result["strategies"]["full"], result["strategies"]["blade"]
    assert full["step_s"]["n"] == blade["step_s"]["n"] == 2
    assert full["tokens_seen_per_step"] == 2 * 4 * 64 == result["meta"]["tokens_per_step"]
    assert blade["tokens_trained_per_step"] == math.ceil(0.6 * blade["tokens_seen_per_step"])
    assert blade["breakdown_s"]["reference_forward"] > 0 and full["breakdown_s"]["reference_forward"] == 0
    assert blade["reference_phase"]["sync_collectives"] == {"ops": 0, "bytes": 0, "names": []}
    assert 0 < blade["topk_rounds_max"] <= result["max_rounds"]
    assert blade["memory"]["state_bytes"] > full["memory"]["state_bytes"] > 0
    assert 0 < full["mfu"] < 1 and result["meta"]["peak_flops"] > 0
    assert full["checkpoint"]["save_s"] > 0 and full["checkpoint"]["error"] is None
    tcmalloc = bool(tcmalloc_path())
    assert result["meta"]["machine"]["malloc"] == ("tcmalloc" if tcmalloc else "glibc")  # launch/malloc.sh
    steered = "tcmalloc decommitting freed pages" if tcmalloc else "glibc mallopt(M_MMAP_THRESHOLD"
    assert steered in result["meta"]["memory_note"]  # the memory probe made the RSS follow the live tensors
    assert blade["checkpoint"]["save_s"] > 0 and blade["checkpoint"]["error"] is None  # its phase's, in place
    # --anchor: the plain DDP loop stepped in the same rounds, and full / DDP among the targets
    assert result["anchor"]["step_s"]["n"] == 2 and result["order"] == ["full", "blade", "ddp"]
    anchor = [t for t in result["targets"] if "plain torch DDP" in t["target"]][0]
    assert anchor["value"] == pytest.approx(full["step_s"]["median"] / result["anchor"]["step_s"]["median"])
    assert not (out_dir / "runs" / "blade" / "checkpoints").exists()  # cleaned up
    report = (out_dir / "report.md").read_text()
    assert "| full |" in report and "| blade |" in report and "## Targets" in report
    assert (out_dir / "breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in out.stdout or "FAIL" in out.stdout
    # --profile: a Chrome trace and a top-operator table for one full and one blade step
    for name in ("full", "blade"):
        trace = json.loads((out_dir / "profile" / f"{name}_trace.json").read_text())
        assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
        table = (out_dir / "profile" / f"{name}_top_ops.txt").read_text()
        assert "Self CPU" in table and "aten::" in table
        top = result["profile"][name]["top_ops"]
        assert len(top) == 8 and top[0]["self_cpu_s"] >= top[-1]["self_cpu_s"] > 0
    assert "## Profile" in report and "| `aten::" in report
