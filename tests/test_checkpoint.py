"""Checkpoints, resume, preemption, the non-finite guard and export (docs/checkpointing.md).

The end-to-end tests launch `python -m blade train` as 2 gloo ranks (ZeRO-3, dropout 0.1) and break
them with the test-only fault hook (blade/runtime/faults.py: SIGKILL / signals / NaN at exact points). A
resumed run must reproduce the uninterrupted run exactly: every metrics record (losses, selected
counts, reference-phase and evaluation losses, diagnostics) and the final proxy and reference
weights and optimizer states, bit for bit.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from blade.errors import BladeError
from blade.interop import export
from blade.runtime import checkpoint, faults
from blade.runtime.metrics import read_metrics
from blade.runtime.preempt import EXIT_PREEMPTED, StopRequest
from blade.train import state
from tests.conftest import ROOT, TINY, tiny_overrides
from tests.dist_harness import free_port, run_distributed

STEPS = 8
# blade syncs at steps 0, 3, 6 (K = 2 reference steps); evaluation after steps 3 and 7
COMMON = (f"train.steps={STEPS}", "selection.tau=3", "selection.k_ref_steps=2", "selection.rho1_ref_steps=2",
          "model.dropout=0.1", "train.eval_interval=4", "train.eval_sequences=16", "checkpoint.keep_last_n=10",
          "dist.timeout_s=20")
INTERVAL = "checkpoint.interval=4"


# ----------------------------------------------------------------------------- helpers


def launch(data, run_dir, *extra, faults_spec="", world=2, timeout=240, on_start=None):
    """`blade train` on `world` local ranks; returns their exit codes. When one rank dies the others
    are killed after 5 s (what torchrun does), instead of waiting for the collective timeout."""
    os.makedirs(run_dir, exist_ok=True)
    args = [sys.executable, "-m", "blade", "train", TINY, *tiny_overrides(data, run_dir, *COMMON, *extra)]
    port, procs = free_port(), []
    for r in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "MASTER_"))}
        env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        env[faults.ENV] = faults_spec
        log = open(os.path.join(run_dir, f"rank{r}.log"), "a")
        procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    if on_start:
        on_start(procs)
    t0, died = time.time(), None
    while any(p.poll() is None for p in procs):
        if died is None and any(p.poll() not in (None, 0, EXIT_PREEMPTED) for p in procs):
            died = time.time()
        if (died and time.time() - died > 5) or time.time() - t0 > timeout:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    return [p.returncode for p in procs]


def log_tail(run_dir):
    return "\n".join(open(f).read()[-1500:] for f in sorted(glob.glob(os.path.join(run_dir, "rank*.log"))))


def records(run_dir):
    """Metrics without wall-clock fields and bookkeeping records (checkpoint, preempt)."""
    out = []
    for r in read_metrics(run_dir):
        if r["kind"] in ("checkpoint", "preempt"):
            continue
        out.append({k: v for k, v in r.items() if not (k.startswith("time_") or k.endswith("time_s"))})
    return out


def ckpt_names(run_dir):
    return [os.path.basename(p) for _, p, ok in checkpoint.list_checkpoints(checkpoint.root(run_dir)) if ok]


def engine_tensors(ckpt):
    """Every tensor of every rank's optimizer state (fp32 master weights, Adam moments, step) of both
    engines, plus the consolidated fp32 proxy weights."""
    def walk(obj, prefix):
        if torch.is_tensor(obj):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from walk(v, f"{prefix}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from walk(v, f"{prefix}/{i}")

    out = {}
    for file in sorted(glob.glob(os.path.join(ckpt, "*", "*optim_states.pt"))):
        # DeepSpeed's own file (it pickles more than tensors): read it the way DeepSpeed does
        state = torch.load(file, weights_only=False, map_location="cpu")["optimizer_state_dict"]
        out.update(walk(state, os.path.relpath(file, ckpt)))
    out.update(walk(export.proxy_fp32_state_dict(ckpt), "proxy_fp32"))
    return out


def assert_same_run(straight, resumed):
    a, b = records(straight), records(resumed)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra == rb, (ra, rb)  # losses, selected counts, ... bitwise (JSON floats round-trip)
    ta = engine_tensors(os.path.join(checkpoint.root(straight), checkpoint.step_name(STEPS)))
    tb = engine_tensors(os.path.join(checkpoint.root(resumed), checkpoint.step_name(STEPS)))
    assert sorted(ta) == sorted(tb) and len(ta) > 20
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


_STRAIGHT = {}


@pytest.fixture
def straight(builtin_data, tmp_path_factory):
    """The uninterrupted run of a strategy (once per session). Checkpoints only at syncs and the end,
    not every 4 steps like the interrupted runs: saving must not change the trajectory."""
    def get(strategy):
        if strategy not in _STRAIGHT:
            run_dir = str(tmp_path_factory.mktemp(f"straight_{strategy}"))
            codes = launch(builtin_data, run_dir, f"selection.strategy={strategy}")
            assert codes == [0, 0], log_tail(run_dir)
            _STRAIGHT[strategy] = run_dir
        return _STRAIGHT[strategy]
    return get


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("strategy", ["blade", "rho1", "random"])
def test_crash_and_resume_is_bit_exact(builtin_data, tmp_path, straight, strategy):
    """SIGKILL rank 0 after step 5 (not at a checkpoint; the other rank dies on the broken collective),
    resume=auto from the checkpoint after step 4 and finish: for blade that crosses the sync and the
    reference phase at step 6, for rho1 the static reference trained at step 0 is restored."""
    base = straight(strategy)
    run_dir = str(tmp_path / "run")
    codes = launch(builtin_data, run_dir, f"selection.strategy={strategy}", INTERVAL,
                   faults_spec="kill@step_end:5#0")
    assert codes[0] == -signal.SIGKILL and codes[1] != 0, log_tail(run_dir)
    assert max(r["step"] for r in read_metrics(run_dir)) == 5
    assert ckpt_names(run_dir)[-1] == "step_000004"
    codes = launch(builtin_data, run_dir, f"selection.strategy={strategy}", INTERVAL, "checkpoint.resume=auto")
    assert codes == [0, 0], log_tail(run_dir)
    assert "resuming from" in log_tail(run_dir) and "step_000004 after 4 steps" in log_tail(run_dir)
    assert_same_run(base, run_dir)
    steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert steps == list(range(STEPS))  # appended without duplicates


def to_format_1(ckpt):
    """Rewrite a checkpoint's own files in the first format's flat layout (blade-checkpoint-1)."""
    file = os.path.join(ckpt, "state.json")
    state = json.load(open(file))
    c = state.pop("components")
    state.update(format="blade-checkpoint-1", counters=c["counters"], streams=c["streams"],
                 reference={"ready": c["reference"]["ready"], "last_sync_step": None},
                 diagnostics_run_total=c["diagnostics"]["run_total"], eval_pending=c["loop"]["eval_pending"],
                 wandb_id=c["metrics"]["wandb_id"], first_last=c["metrics"]["first_last"])
    json.dump(state, open(file, "w"))
    for rank_file in glob.glob(os.path.join(ckpt, "rank_*.pt")):
        mine = torch.load(rank_file, weights_only=True)
        c = mine.pop("components")
        mine.update(diagnostics_window=c["diagnostics"]["window"],
                    last_score_mean=c["diagnostics"]["last_score_mean"],
                    bad_samples={name: d["bad_samples"] for name, d in c["data"].items()})
        torch.save(mine, rank_file)


@pytest.mark.parametrize("error, message", [("enospc", "No space left on device (ENOSPC)"),
                                            ("eacces", "Permission denied (EACCES)")])
def test_a_failed_save_stops_cleanly_and_keeps_the_resume_point(builtin_data, tmp_path, straight, error, message):
    """The save after step 4 fails on rank 1 only (a full disk / a read-only directory, injected): both
    ranks stop with one line naming the previous checkpoint (the one before the sync at step 3),
    which then resumes the run exactly."""
    base = straight("blade")
    run_dir = str(tmp_path / "run")
    codes = launch(builtin_data, run_dir, "checkpoint.interval=2", faults_spec=f"{error}@save:4:after_proxy#1")
    assert codes == [2, 2], log_tail(run_dir)
    tail = log_tail(run_dir)
    assert f"cannot write checkpoint {checkpoint.root(run_dir)}/step_000004: {message}" in tail
    assert f"the resume point stays {checkpoint.root(run_dir)}/step_000003" in tail and "Traceback" not in tail
    assert ckpt_names(run_dir) == ["step_000002", "step_000003"]
    assert launch(builtin_data, run_dir, "checkpoint.interval=2", "checkpoint.resume=auto") == [0, 0]
    assert_same_run(base, run_dir)


def test_format_1_checkpoint_resumes_bit_exactly(builtin_data, tmp_path, straight):
    """A checkpoint in the first format (flat keys) still resumes, exactly like the current one."""
    base = straight("blade")
    run_dir = str(tmp_path / "run")
    codes = launch(builtin_data, run_dir, INTERVAL, faults_spec="kill@step_end:5#0")
    assert codes[0] == -signal.SIGKILL, log_tail(run_dir)
    to_format_1(os.path.join(checkpoint.root(run_dir), "step_000004"))
    codes = launch(builtin_data, run_dir, INTERVAL, "checkpoint.resume=auto")
    assert codes == [0, 0], log_tail(run_dir)
    assert "step_000004 after 4 steps" in log_tail(run_dir)
    assert_same_run(base, run_dir)


@pytest.mark.slow  # four launches: 30-60 s on 2 busy cores
def test_torn_saves_resume_from_the_last_complete_checkpoint(builtin_data, tmp_path, straight):
    """Kill rank 0 inside three saves: after its proxy files (step 4), after the barrier but before
    COMPLETE (step 6), and after COMPLETE but before `latest` moved (step 8). auto picks the newest
    directory holding COMPLETE each time and the run ends bit-exactly as if never interrupted."""
    base = straight("blade")
    run_dir = str(tmp_path / "run")
    args = ("selection.strategy=blade", INTERVAL, "checkpoint.resume=auto")
    ckpts = checkpoint.root(run_dir)

    assert launch(builtin_data, run_dir, *args, faults_spec="kill@save:4:after_proxy#0")[0] == -signal.SIGKILL
    assert ckpt_names(run_dir) == ["step_000003"] and os.path.isdir(os.path.join(ckpts, "step_000004"))
    assert checkpoint.newest_complete(ckpts).endswith("step_000003")

    assert launch(builtin_data, run_dir, *args, faults_spec="kill@save:6:before_complete#0")[0] == -signal.SIGKILL
    assert ckpt_names(run_dir) == ["step_000003", "step_000004"]
    assert os.path.isfile(os.path.join(ckpts, "step_000006", "state.json"))  # all files, no COMPLETE

    assert launch(builtin_data, run_dir, *args, faults_spec="kill@save:8:before_latest#0")[0] == -signal.SIGKILL
    assert ckpt_names(run_dir)[-1] == "step_000008"
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_000006"

    assert launch(builtin_data, run_dir, *args) == [0, 0], log_tail(run_dir)
    assert "step_000008 after 8 steps" in log_tail(run_dir)
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_000008"
    assert_same_run(base, run_dir)
    assert not [n for n in os.listdir(ckpts) if "deleting" in n]


@pytest.mark.slow  # five launches: 40-75 s on 2 busy cores
def test_preemption_signals_checkpoint_and_exit_75(builtin_data, tmp_path, straight):
    """SIGTERM on rank 1 in the middle of step 1, SIGUSR1 on rank 0 while the phase of step 3 scores its
    pool, SIGUSR1 on rank 0 inside the reference steps of step 6, SIGTERM on rank 1 between evaluation
    batches after step 7: every time both ranks agree, checkpoint and exit 75; resuming four times
    reproduces the uninterrupted run. Checkpoints every 3 steps fall on the syncs: they are the
    syncs' own (after w <- u, without the reference)."""
    base = straight("blade")
    run_dir = str(tmp_path / "run")
    args = ("selection.strategy=blade", "checkpoint.interval=3", "checkpoint.resume=auto")
    ckpts = checkpoint.root(run_dir)

    assert launch(builtin_data, run_dir, *args, faults_spec="sigterm@train_step:1#1") == [75, 75], log_tail(run_dir)
    assert ckpt_names(run_dir) == ["step_000002"]  # written at the boundary after step 1
    assert "SIGTERM received on rank 1" in log_tail(run_dir)

    # before the sync: the state before the phase is saved, with the outgoing reference w_prev
    codes = launch(builtin_data, run_dir, *args, faults_spec="sigusr1@ref_score:3:1#0")
    assert codes == [75, 75], log_tail(run_dir)
    assert ckpt_names(run_dir)[-1] == "step_000003"
    assert os.path.isdir(os.path.join(ckpts, "step_000003", "reference"))
    assert state.read_state(os.path.join(ckpts, "step_000003"))["components"]["phase"] == {"pending": None}

    codes = launch(builtin_data, run_dir, *args, faults_spec="sigusr1@ref_step:6:1#0")
    assert codes == [75, 75], log_tail(run_dir)
    # after the sync: the partial phase is dropped and its sync checkpoint, written after w <- u with
    # the pool masks and without the reference (it equals the proxy there), is the resume point
    assert ckpt_names(run_dir)[-1] == "step_000006"
    stop = [r for r in read_metrics(run_dir) if r["kind"] == "preempt"][-1]
    assert stop["where"] == "ref_step" and stop["checkpoint"].endswith("step_000006")
    assert not os.path.exists(os.path.join(ckpts, "step_000006", "reference"))
    assert state.read_state(os.path.join(ckpts, "step_000006"))["components"]["phase"]["pending"]["step"] == 6
    assert torch.load(os.path.join(ckpts, "step_000006", "rank_00001.pt"),
                      weights_only=True)["components"]["phase"]["masks"].any()

    codes = launch(builtin_data, run_dir, *args, faults_spec="sigterm@eval_batch:7:1#1")
    assert codes == [75, 75], log_tail(run_dir)
    assert ckpt_names(run_dir)[-1] == "step_000008"
    assert json.load(open(os.path.join(ckpts, "step_000008", "state.json")))["components"]["loop"]["eval_pending"] == 7

    assert launch(builtin_data, run_dir, *args) == [0, 0], log_tail(run_dir)  # only the cut evaluation is left
    assert_same_run(base, run_dir)


def test_a_sync_checkpoint_finishes_its_phase_whatever_the_schedule(builtin_data, tmp_path, straight):
    """The straight blade run's checkpoint of step 6 is its sync checkpoint (no reference files). A resume
    from it with another tau (a continuation, not bit-exact) still runs that phase first: the reference
    is synced and trained before step 6 scores with it, with the same result as the straight run."""
    base = straight("blade")
    sync = os.path.join(checkpoint.root(base), "step_000006")
    assert not os.path.exists(os.path.join(sync, "reference"))
    run_dir = str(tmp_path / "run")
    assert launch(builtin_data, run_dir, "selection.strategy=blade", "selection.tau=4",
                  f"checkpoint.resume={sync}") == [0, 0], log_tail(run_dir)
    ref = [r for r in records(run_dir) if r["kind"] == "ref"]
    assert [r["step"] for r in ref] == [6]  # the pending phase (tau 4 would sync at 4 and 8)
    assert ref[0] == [r for r in records(base) if r["kind"] == "ref" and r["step"] == 6][0]


def test_external_sigterm_to_one_rank(builtin_data, tmp_path, straight):
    """A real signal from outside, as SLURM sends it: rank 0 pauses in step 3 (test hook) so that
    the test can SIGTERM rank 1 while it waits in a collective."""
    base = straight("random")
    run_dir = str(tmp_path / "run")
    args = ("selection.strategy=random", INTERVAL, "checkpoint.resume=auto")

    def send_when_step_2_is_logged(procs):
        metrics, deadline = os.path.join(run_dir, "metrics.jsonl"), time.time() + 120
        while time.time() < deadline:
            if os.path.exists(metrics) and any(r.get("kind") == "train" and r["step"] == 2
                                               for r in read_metrics(run_dir)):
                procs[1].send_signal(signal.SIGTERM)
                return
            time.sleep(0.05)

    codes = launch(builtin_data, run_dir, *args, faults_spec="sleep@train_step:3#0",
                   on_start=send_when_step_2_is_logged)
    assert codes == [75, 75], log_tail(run_dir)
    assert ckpt_names(run_dir) == ["step_000004"]
    assert launch(builtin_data, run_dir, *args) == [0, 0], log_tail(run_dir)
    assert_same_run(base, run_dir)


def test_wall_time_budget_stops_at_the_first_boundary(builtin_data, tmp_path):
    """A 1 s budget is spent before the first step ends (process start counts): stop, checkpoint, 75."""
    run_dir = str(tmp_path / "run")
    codes = launch(builtin_data, run_dir, "selection.strategy=random", "train.max_wall_time_s=1")
    assert codes == [75, 75], log_tail(run_dir)
    assert ckpt_names(run_dir) == ["step_000001"]
    stop = [r for r in read_metrics(run_dir) if r["kind"] == "preempt"]
    assert len(stop) == 1 and "wall time" in stop[0]["reason"] and stop[0]["step"] == 0


def test_nonfinite_steps_are_skipped_then_abort(builtin_data, tmp_path):
    """NaN losses on one rank (step 2), NaN gradients with finite losses (step 4): skipped on both
    ranks, weights and Adam state untouched, counted; three in a row (6, 7, 8) abort with exit 2 and
    a checkpoint of the last good weights."""
    run_dir = str(tmp_path / "run")
    spec = "nan_loss@train_step:2#0,nan_grad@train_step:4#1," + ",".join(
        f"nan_loss@train_step:{s}" for s in (6, 7, 8))
    codes = launch(builtin_data, run_dir, "selection.strategy=blade", "train.steps=12", "checkpoint.interval=1",
                   "checkpoint.keep_last_n=20", "train.max_nonfinite_steps=3", "train.eval_interval=0",
                   faults_spec=spec)
    assert codes == [2, 2], log_tail(run_dir)
    assert "3 non-finite steps in a row (6..8)" in log_tail(run_dir)
    metrics = read_metrics(run_dir)
    skips = [r for r in metrics if r["kind"] == "skip"]
    assert [r["step"] for r in skips] == [2, 4, 6, 7, 8] and skips[-1]["nonfinite_skipped"] == 5
    assert "non-finite token losses" in skips[0]["reason"] and skips[1]["reason"] == "non-finite gradient norm"
    train = {r["step"]: r for r in metrics if r["kind"] == "train"}
    assert sorted(train) == [0, 1, 3, 5] and train[3]["nonfinite_skipped"] == 1
    assert all(r["lr"] == pytest.approx(0.002 * (r["step"] + 1) / 10) for r in skips)  # schedule advances
    ckpts = checkpoint.root(run_dir)

    def same(a, b):
        ta, tb = (engine_tensors(os.path.join(ckpts, checkpoint.step_name(c))) for c in (a, b))
        return all(torch.equal(ta[k], tb[k]) for k in ta if k.startswith(("proxy", "proxy_fp32")))

    assert same(2, 3) and same(4, 5) and same(6, 9)  # skipped steps changed nothing
    assert not same(1, 2)  # a normal step does
    assert ckpt_names(run_dir)[-1] == "step_000009"


@pytest.mark.slow  # several 2- and 4-rank launches: 30-60 s on 2 busy cores
@pytest.mark.parametrize("before, after, start", [(4, 2, 4), (2, 4, 6)])
def test_resume_on_another_world_size(builtin_data, tmp_path, before, after, start):
    """The global batch stays 16 sequences (micro 4 x 2 ranks = micro 2 x 4 ranks). Weights, Adam
    moments and data positions carry over exactly; what differs is the order in which gradients are
    summed (and the re-derived RNG, which dropout 0 leaves unused), so the losses after the resume
    agree to 1e-5 relative (measured: < 1e-7) and the same tokens are seen and selected. From step 4
    the resumed run crosses the sync of step 6; step 6 is that sync's checkpoint, written inside the
    phase: the 4 ranks find their pool masks among the 2 old ranks' by stream position."""
    micro = {2: "train.micro_batch_size=4", 4: "train.micro_batch_size=2"}
    args = ("selection.strategy=blade", "model.dropout=0.0", INTERVAL)
    base, run_dir = str(tmp_path / "straight"), str(tmp_path / "resharded")
    assert launch(builtin_data, base, *args, micro[before], world=before) == [0] * before, log_tail(base)
    path = os.path.join(checkpoint.root(base), checkpoint.step_name(start))
    codes = launch(builtin_data, run_dir, *args, micro[after], f"checkpoint.resume={path}", world=after)
    assert codes == [0] * after, log_tail(run_dir)
    assert f"resharding from {before} to {after} ranks" in log_tail(run_dir)
    kinds = ("train", "eval", "ref")
    a = [r for r in read_metrics(base) if r["kind"] in kinds and r["step"] >= start]
    b = [r for r in read_metrics(run_dir) if r["kind"] in kinds]
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        key = {"train": "loss", "eval": "val_loss", "ref": "ref_final_loss"}[ra["kind"]]
        assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra, rb)
        if ra["kind"] == "ref":
            continue
        assert ra["tokens_seen"] == rb["tokens_seen"]
        if ra["kind"] == "train":
            assert (ra["n_valid"], ra["n_selected"]) == (rb["n_valid"], rb["n_selected"])
    end = [json.load(open(os.path.join(checkpoint.root(d), "step_000008", "state.json"))) for d in (base, run_dir)]
    assert end[0]["components"]["streams"] == end[1]["components"]["streams"]  # no sample repeated or skipped, in every stream
    assert end[1]["world_size"] == after


# ----------------------------------------------------------------------------- export


def _train_and_score(rank, world, overrides, tokens):
    from blade.config import load_config
    from blade.runtime.dist import World
    from blade.train.loop import Trainer

    cfg = load_config(TINY, overrides)
    tr = Trainer(cfg, World(rank, world, rank, "cpu"))
    tr.fit()
    batch = torch.tensor(tokens)
    tr.proxy.eval()
    with torch.no_grad():
        losses = tr.proxy(batch[:, :-1], batch[:, 1:])
    return {"losses": losses.tolist(), "checkpoint": tr.last_path}


@pytest.fixture(scope="module")
def exported_run(builtin_data, tmp_path_factory):
    from blade.data.reader import ShardDataset

    run_dir = str(tmp_path_factory.mktemp("export_run"))
    val = ShardDataset(os.path.join(builtin_data, "val"))
    tokens = [val[i]["tokens"].tolist() for i in range(4)]
    overrides = tiny_overrides(builtin_data, run_dir, "selection.strategy=random", "train.steps=3",
                               "train.eval_interval=0")
    out = run_distributed(_train_and_score, 2, args=(overrides, tokens), deepspeed=True)[0]
    return out, tokens


def test_export_gives_the_live_proxy_losses(exported_run, tmp_path):
    from blade.cli import main

    live, tokens = exported_run
    out = str(tmp_path / "exported")
    assert main(["export", os.path.dirname(os.path.dirname(live["checkpoint"])), out]) == 0
    assert sorted(os.listdir(out)) == ["config.yaml", "export.json", "model.safetensors", "tokenizer.model"]
    model = export.load_exported(out)  # plain torch: no DeepSpeed engine, no process group
    batch = torch.tensor(tokens)
    with torch.no_grad():
        losses = model(batch[:, :-1], batch[:, 1:])
    assert torch.equal(losses, torch.tensor(live["losses"]))
    assert json.load(open(os.path.join(out, "export.json")))["step"] == 3


def test_export_errors_are_clear(exported_run, tmp_path):
    import shutil

    ckpt = exported_run[0]["checkpoint"]
    torn = str(tmp_path / "step_000003")
    shutil.copytree(ckpt, torn)
    os.remove(os.path.join(torn, checkpoint.COMPLETE))
    with pytest.raises(BladeError, match="incomplete .*no COMPLETE marker"):
        export.export(torn, str(tmp_path / "a"))

    broken = str(tmp_path / "broken" / "step_000003")
    shutil.copytree(ckpt, broken)
    for f in glob.glob(os.path.join(broken, "proxy", "*optim_states.pt")):
        with open(f, "r+b") as fh:
            fh.truncate(100)
    with pytest.raises(BladeError, match="cannot read the proxy weights .* the checkpoint is damaged"):
        export.export(broken, str(tmp_path / "b"))

    with pytest.raises(BladeError, match="no checkpoint at"):
        export.export(str(tmp_path / "nothing"), str(tmp_path / "c"))

    out = str(tmp_path / "ok")
    export.export(ckpt, out)
    cfg_file = os.path.join(out, "config.yaml")
    text = open(cfg_file).read()
    open(cfg_file, "w").write(text.replace("dim: 64", "dim: 32"))
    with pytest.raises(BladeError, match="has shape .* says"):
        export.load_exported(out)
    open(cfg_file, "w").write(text)
    with open(os.path.join(out, "model.safetensors"), "r+b") as fh:
        fh.truncate(50)
    with pytest.raises(BladeError, match="model.safetensors is corrupt"):
        export.load_exported(out)


# ----------------------------------------------------------------------------- untrusted files


class _RunsCode:
    """Pickles as a call of os.system: loading it with weights_only=False would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_never_runs_code(exported_run, builtin_data, tmp_path):
    """Every DeepSpeed file of the proxy replaced by a pickle that would run a shell command: resume
    (same and another world size) and export refuse it in one line, and the command never runs."""
    import shutil

    marker = tmp_path / "ran"
    evil = str(tmp_path / "evil" / "checkpoints" / "step_000003")
    shutil.copytree(exported_run[0]["checkpoint"], evil)
    for f in glob.glob(os.path.join(evil, "proxy", "*.pt")):
        torch.save({"module": _RunsCode(marker)}, f)
    fresh = str(tmp_path / "fresh")
    attempt = tiny_overrides(builtin_data, fresh, "selection.strategy=random", f"checkpoint.resume={evil}")
    same_world = run_distributed(_refusals, 2, deepspeed=True, args=([attempt],))[0][0]
    resharded = run_distributed(_refusals, 1, deepspeed=True, args=([attempt],))[0][0]
    with pytest.raises(BladeError) as exported:
        export.export(evil, str(tmp_path / "out"))
    for message in (same_world, resharded, str(exported.value)):
        assert message and "refused" in message and "posix.system" in message, message
        assert "\n" not in message
    assert not marker.exists()


# ----------------------------------------------------------------------------- resume refusals


def _refusals(rank, world, attempts):
    from blade.config import load_config
    from blade.runtime.dist import World
    from blade.train.loop import Trainer

    messages = []
    for overrides in attempts:
        try:
            Trainer(load_config(TINY, overrides), World(rank, world, rank, "cpu"))
            messages.append(None)
        except BladeError as e:
            messages.append(str(e))
    return messages


def test_resume_refuses_mismatches(exported_run, builtin_data, tmp_path):
    ckpt = exported_run[0]["checkpoint"]  # written by 2 ranks, strategy random
    run_dir = os.path.dirname(os.path.dirname(ckpt))
    fresh = str(tmp_path / "fresh")

    def attempt(*extra, run=fresh):
        return tiny_overrides(builtin_data, run, "selection.strategy=random", "train.eval_interval=0", *extra)

    got = run_distributed(_refusals, 2, deepspeed=True, args=([
        attempt(f"checkpoint.resume={ckpt}", "train.steps=4"),  # resumable (world size: see the units)
        attempt(f"checkpoint.resume={ckpt}", "selection.strategy=full"),
        attempt(f"checkpoint.resume={ckpt}", "model.dim=32"),
        attempt(f"checkpoint.resume={ckpt}", f"data.train={builtin_data}/target"),
        attempt(run=run_dir),                                   # resume=none over existing checkpoints
        attempt("checkpoint.resume=auto", run=str(tmp_path / "empty")),   # nothing to resume: fresh
    ],))[0]
    assert got[0] is None
    assert "selection.strategy was 'random', this run has 'full'" in got[1]
    assert "the model shape differs" in got[2]
    assert "data.train shards differ" in got[3] and "allow_data_change" in got[3]
    assert "already holds checkpoint" in got[4] and "checkpoint.resume=auto" in got[4]
    assert got[5] is None


# ----------------------------------------------------------------------------- units


def _fake_ckpt(root, completed, complete=True):
    path = os.path.join(root, checkpoint.step_name(completed))
    os.makedirs(path)
    with open(os.path.join(path, checkpoint.STATE), "w") as f:
        json.dump({"format": checkpoint.FORMAT, "step": completed}, f)
    if complete:
        open(os.path.join(path, checkpoint.COMPLETE), "w").write(f"{completed}\n")
    return path


def test_newest_complete_and_find(tmp_path):
    root = checkpoint.root(str(tmp_path))
    _fake_ckpt(root, 2)
    _fake_ckpt(root, 10)
    _fake_ckpt(root, 12, complete=False)
    os.makedirs(os.path.join(root, "step_000011.deleting-1"))
    assert checkpoint.newest_complete(root).endswith("step_000010")  # 10 > 2: numeric, not lexical
    assert checkpoint.find_checkpoint(str(tmp_path)).endswith("step_000010")
    assert checkpoint.find_checkpoint(root).endswith("step_000010")
    with pytest.raises(BladeError, match="incomplete"):
        checkpoint.find_checkpoint(os.path.join(root, "step_000012"))
    assert checkpoint.newest_complete(str(tmp_path / "none")) is None


def test_prune_keeps_the_newest_and_the_one_just_written(tmp_path):
    root = str(tmp_path)
    for c in (1, 2, 3, 4):
        _fake_ckpt(root, c)
    _fake_ckpt(root, 5, complete=False)  # torn, older than the one just written: garbage
    new = _fake_ckpt(root, 6)
    checkpoint.prune(root, 2, keep=new)
    assert [(c, ok) for c, _, ok in checkpoint.list_checkpoints(root)] == [(4, True), (6, True)]
    checkpoint.prune(root, 1, keep=os.path.join(root, "step_000004"))  # never the one just written
    assert [c for c, _, _ in checkpoint.list_checkpoints(root)] == [4, 6]


def test_supersede_later_moves_abandoned_checkpoints(tmp_path):
    root = str(tmp_path)
    for c in (2, 4, 6):
        _fake_ckpt(root, c)
    _fake_ckpt(root, 8, complete=False)
    moved = checkpoint.supersede_later(root, 4)
    assert [c for c, _, _ in checkpoint.list_checkpoints(root)] == [2, 4]
    assert len(moved) == 1 and os.path.isdir(moved[0]) and "superseded" in moved[0]


def test_truncate_records(tmp_path):
    file = str(tmp_path / "metrics.jsonl")
    lines = [{"kind": "train", "step": s} for s in range(6)] + [
        {"kind": "eval", "step": 3}, {"kind": "summary", "step": 5}]
    with open(file, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
        f.write('{"kind": "train", "st')  # torn by a crash
    assert checkpoint.truncate_records(file, 4, eval_pending=3) == 5
    assert [(r["kind"], r["step"]) for r in read_metrics(str(tmp_path))] == [("train", s) for s in range(4)]
    assert checkpoint.truncate_records(file, 4) == 0
    assert checkpoint.truncate_records(str(tmp_path / "missing.jsonl"), 4) == 0


def _identity(**change):
    base = {"world_size": 2, "zero_stage": 3, "precision": "fp32", "ref_precision": "same",
            "strategy": "blade", "model_shape": {"tok_emb.weight": [512, 64]},
            "data": {"train": "a", "target": "b", "val": "c", "tokenizer": "t"}}
    for key, value in change.items():
        if key in ("train", "target", "val", "tokenizer"):
            base["data"] = {**base["data"], key: value}
        else:
            base[key] = value
    return base


@pytest.mark.parametrize("change, message", [
    ({"strategy": "rho1"}, "selection.strategy was 'blade', this run has 'rho1'"),
    ({"zero_stage": 2}, "deepspeed.zero_stage was 3"),
    ({"precision": "bf16"}, "train.precision was 'fp32'"),
    ({"model_shape": {"tok_emb.weight": [512, 32]}}, r"model shape differs \(tok_emb.weight: \[512, 64\]"),
    ({"tokenizer": "u"}, "tokenized with another tokenizer"),
    ({"train": "x"}, "data.train shards differ"),
    ({"target": "x"}, "data.target shards differ"),
])
def test_check_compatible_refuses(change, message):
    with pytest.raises(BladeError, match=message):
        state.check_compatible(_identity(), _identity(**change), allow_data_change=False)


def test_world_size_change_needs_zero3():
    warnings = state.check_compatible(_identity(), _identity(world_size=4), False)
    assert len(warnings) == 1 and "resharding from 2 to 4 ranks" in warnings[0]
    with pytest.raises(BladeError, match="world size was 2, this run has 4; relaunch with the checkpoint's "
                                         "number of ranks"):
        state.check_compatible(_identity(zero_stage=2), _identity(zero_stage=2, world_size=4), False)


def test_check_compatible_warnings():
    assert state.check_compatible(_identity(), _identity(), False) == []
    warnings = state.check_compatible(_identity(), _identity(train="x", val="y"), True)
    assert len(warnings) == 2 and "allow_data_change" in warnings[0] and "not comparable" in warnings[1]
    changes = state.config_changes({"optim": {"lr": 1.0}, "run": {"dir": "a"}},
                                   {"optim": {"lr": 2.0}, "run": {"dir": "b"}})
    assert changes == ["optim.lr: 1.0 -> 2.0"]


def test_rng_states_round_trip_with_weights_only(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    torch.save({"rng": checkpoint.rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_stop_request_signals_and_wall_time():
    clock = [100.0]
    stop = StopRequest(max_wall_time_s=60, start_time=100.0, clock=lambda: clock[0])
    assert stop.agreed() is None  # no process group: a world of one
    stop.note(step_s=2.0)
    assert stop.margin() == pytest.approx(1.5 * (2.0 + 4.0) + 5.0)  # no save yet: two steps assumed
    clock[0] = 100.0 + 60 - 15  # 45 s used + 14 s margin < 60 s: carry on
    assert stop.agreed() is None
    clock[0] = 100.0 + 60 - 13
    assert "wall time" in stop.agreed()
    stop = StopRequest(0, start_time=0.0, clock=lambda: 1e9)
    assert not stop.out_of_time()  # 0 = off
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed() == "signal SIGUSR1"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_fault_spec_parsing(monkeypatch):
    monkeypatch.setenv(faults.ENV, "nan_loss@train_step:4#1,nan_grad@train_step:4,kill@save:6:begin#0")
    monkeypatch.setenv("RANK", "1")
    assert faults.point("train_step", 4) == {"nan_loss", "nan_grad"}
    assert faults.point("train_step", 5) == set()
    assert faults.point("save", 6, "begin") == set()  # rank 0 only
    monkeypatch.delenv(faults.ENV)
    assert faults.point("train_step", 4) == set()
