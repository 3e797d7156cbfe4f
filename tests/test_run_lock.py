"""blade.runtime.run_lock: one job per run directory (held by a live process, free once it dies),
and ranks that do not outlive a SIGKILLed torchrun."""
import os
import signal
import subprocess
import sys
import time

import pytest

from blade.errors import ConfigError
from blade.runtime import run_lock
from tests.conftest import ROOT, TINY, tiny_overrides

HOLD = ("import sys, time; from blade.runtime import run_lock; run_lock.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(60)")


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_job_is_refused_until_the_first_one_dies(tmp_path):
    run_dir = str(tmp_path / "run")
    first = _holder(run_dir)
    try:
        with pytest.raises(ConfigError, match=rf"run.dir {run_dir} is in use by pid {first.pid} on "):
            run_lock.acquire(run_dir)
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up at all: the kernel drops the lock
        first.wait()
    run_lock.acquire(run_dir)  # a stale lock is taken over
    run_lock.acquire(run_dir)  # and taking it again in the same process is a no-op
    run_lock.release(run_dir)


def _pids_of(run_dir):
    out = subprocess.run(["pgrep", "-f", f"run.dir={run_dir}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_ranks_stop_when_torchrun_is_killed(tmp_path, builtin_data):
    """SIGKILL to torchrun: its ranks get SIGTERM (parent-death signal), checkpoint and exit."""
    run_dir = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    launcher = subprocess.Popen(["bash", "launch/local.sh", "2", "-c", TINY,
                                 *tiny_overrides(builtin_data, run_dir, "train.steps=100000", "logging.progress=false")],
                                cwd=ROOT, env={**env, "PYTHON": sys.executable}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    metrics, deadline = os.path.join(run_dir, "metrics.jsonl"), time.time() + 180
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.2)
    ranks = [p for p in _pids_of(run_dir) if p != launcher.pid]
    assert len(ranks) >= 2, "the ranks did not start"
    launcher.send_signal(signal.SIGKILL)  # bash exec'd torchrun: this is the launcher itself
    launcher.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in ranks):
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") for p in ranks), "ranks outlived their launcher"
    assert os.path.isdir(os.path.join(run_dir, "checkpoints")) and [
        n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith("step_")]
