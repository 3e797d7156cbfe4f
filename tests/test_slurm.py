"""blade on a real SLURM cluster of emulated nodes (tests/slurm/start_local_slurm.sh): sbatch + srun, no ssh.

Every run is compared with the same run launched locally by launch/local.sh."""
import os
import re
import shutil
import subprocess
import time

import pytest

from blade.runtime.metrics import read_metrics
from tests.conftest import ROOT, TINY, tiny_overrides

SLURM = os.path.join(ROOT, "tests", "slurm")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the local SLURM cluster needs root and apt-get (Debian) to install slurmctld/slurmd/munge")
    start = subprocess.run(["bash", os.path.join(SLURM, "start_local_slurm.sh")], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "LOCAL_SLURM_CPUS": "4"})
    if start.returncode != 0:
        pytest.skip(f"could not start the local SLURM cluster: {start.stderr.strip().splitlines()[-1:]}")
    yield
    subprocess.run(["bash", os.path.join(SLURM, "stop_local_slurm.sh")], capture_output=True, timeout=120)


def _env():
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_"))}
    return {**keep, "SLURM_CONF": "/tmp/local-slurm/cluster/etc/slurm.conf", "DS_ACCELERATOR": "cpu"}


def sbatch(out: str, *args) -> str:
    res = subprocess.run(["sbatch", "--parsable", "-o", out, "-D", ROOT, *args], capture_output=True, text=True,
                         env=_env(), check=True, cwd=ROOT)
    return res.stdout.strip().split(";")[0]


def wait_gone(job: str, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=_env()).stdout.strip():
            return time.time() - t0
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=_env())
    raise AssertionError(f"job {job} still in the queue after {timeout} s")


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=_env()).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def local_run(run_dir, ranks, overrides):
    subprocess.run(["bash", "launch/local.sh", str(ranks), "-c", TINY, *overrides, f"run.dir={run_dir}"],
                   check=True, cwd=ROOT, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=600)
    return losses(run_dir)


@pytest.mark.parametrize("tasks_per_node", [1, 2])
def test_sbatch_two_nodes_equals_local_run(cluster, builtin_data, tmp_path, tasks_per_node):
    common = [o for o in tiny_overrides(builtin_data, "unused", "selection.strategy=blade", "selection.tau=3",
                                        "selection.k_ref_steps=1", "train.steps=5", "train.micro_batch_size=2")
              if not o.startswith("run.dir=")]
    slurm_dir = str(tmp_path / "slurm")
    t0 = time.time()
    job = sbatch(str(tmp_path / "job.out"), "-N2", f"--ntasks-per-node={tasks_per_node}",
                 "launch/slurm/train.sbatch", TINY, *common, f"run.dir={slurm_dir}")
    wait_gone(job, 600)
    log = open(tmp_path / "job.out").read()
    assert job_field(job, "JobState") == "COMPLETED", log[-3000:]
    nodes = set(re.findall(r"on (n\[1-2\])", log))
    assert nodes == {"n[1-2]"}, log[:500]
    ranks = 2 * tasks_per_node
    expected = local_run(str(tmp_path / "local"), ranks, common)
    # the same ranks, batch layout and gloo reductions: identical up to fp32 round-off
    assert losses(slurm_dir) == pytest.approx(expected, rel=1e-5)
    print(f"sbatch -> done in {time.time() - t0:.1f} s for {ranks} ranks")


def test_a_failing_rank_ends_the_job_promptly(cluster, builtin_data, tmp_path):
    run_dir = str(tmp_path / "fail")
    job = sbatch(str(tmp_path / "job.out"), "-N2", "--ntasks-per-node=1", "launch/slurm/train.sbatch", TINY,
                 *tiny_overrides(builtin_data, run_dir, "train.steps=100000", "dist.timeout_s=600"))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    t0 = time.time()
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert time.time() - t0 < 300, "training did not start"
        time.sleep(0.5)
    victim = _pid_of_rank(run_dir, 1)
    os.kill(victim, 9)
    took = wait_gone(job, 120)
    assert took < 60, f"the job took {took:.0f} s to end after rank 1 died"
    assert job_field(job, "JobState") in ("FAILED", "CANCELLED"), job_field(job, "JobState")


def _pid_of_rank(run_dir: str, rank: int) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"run.dir={run_dir}".encode() in cmd and f"SLURM_PROCID={rank}".encode() in env \
                and b"blade" in b" ".join(cmd) and b"srun" not in cmd[0]:
            return int(pid)
    raise AssertionError(f"no process for rank {rank} of {run_dir}")


def _records(run_dir):
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.mark.parametrize("signal", ["USR1", "TERM"])
def test_preemption_requeues_and_resumes_bit_exactly(cluster, builtin_data, tmp_path, signal):
    """scancel --signal mid-run -> checkpoint -> exit 75 -> scontrol requeue -> the rerun resumes and
    finishes: Restarts=1, every step logged once, and the same losses and final weights as a run
    that was never interrupted."""
    import torch

    from blade.interop.export import proxy_fp32_state_dict

    common = ("selection.strategy=blade", "selection.tau=6", "selection.k_ref_steps=2", "train.steps=24",
              "train.micro_batch_size=2", "model.dropout=0.1", "train.eval_interval=8")
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    t0 = time.time()
    job = sbatch(str(tmp_path / "stopped.out"), "-N2", "--ntasks-per-node=1", "launch/slurm/train.sbatch", TINY,
                 *tiny_overrides(builtin_data, stopped, *common))
    while len(_records(stopped) if os.path.exists(os.path.join(stopped, "metrics.jsonl")) else []) < 10:
        assert time.time() - t0 < 300, "training did not get to step 10"
        time.sleep(0.3)
    subprocess.run(["scancel", f"--signal={signal}", job], check=True, env=_env())
    t_signal = time.time()
    wait_gone(job, 600)
    log = open(tmp_path / "stopped.out").read()
    assert job_field(job, "JobState") == "COMPLETED", log[-3000:]
    assert job_field(job, "Restarts") == "1", log[-3000:]
    assert "requeueing job" in log and "restart 1" in log
    print(f"{signal}: signal to completion of the requeued job {time.time() - t_signal:.1f} s")

    job2 = sbatch(str(tmp_path / "straight.out"), "-N2", "--ntasks-per-node=1", "launch/slurm/train.sbatch",
                  TINY, *tiny_overrides(builtin_data, straight, *common))
    wait_gone(job2, 600)
    assert job_field(job2, "Restarts") == "0" and job_field(job2, "JobState") == "COMPLETED"

    a, b = _records(straight), _records(stopped)
    assert [r["step"] for r in b] == list(range(24))  # each step exactly once, in order
    assert [(r["loss"], r["n_selected"]) for r in a] == [(r["loss"], r["n_selected"]) for r in b]
    wa = proxy_fp32_state_dict(os.path.join(straight, "checkpoints", "step_000024"))
    wb = proxy_fp32_state_dict(os.path.join(stopped, "checkpoints", "step_000024"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
