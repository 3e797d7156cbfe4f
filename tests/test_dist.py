"""Launcher environments: SLURM variables, single process, and real launches through each launcher."""
import os
import subprocess
import sys

import pytest

from blade.runtime.dist import first_slurm_host, map_launcher_env
from blade.runtime.metrics import read_metrics
from tests.conftest import ROOT, TINY, tiny_overrides
from tests.dist_harness import free_port


def test_slurm_variables_are_mapped(monkeypatch):
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "12345",
           "SLURM_JOB_NODELIST": "n[7-8]"}
    map_launcher_env(env)
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "n7"
    assert env["MASTER_PORT"] == str(20000 + 12345 % 20000)


def test_existing_launcher_variables_win():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    map_launcher_env(env)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2"


def test_single_process_defaults():
    env = {}
    map_launcher_env(env)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0


@pytest.mark.parametrize("nodelist,first", [("n1", "n1"), ("n[1-3]", "n1"), ("gpu[07,09]", "gpu07"),
                                            ("a1,b2", "a1")])
def test_first_slurm_host_without_scontrol(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the fallback parser
    assert first_slurm_host(nodelist) == first


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def _blade_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                    "LOCAL_RANK", "MASTER_"))}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def test_every_launcher_gives_the_same_run(builtin_data, tmp_path):
    """A single process (micro 8) vs 2 ranks (micro 4) through torchrun, srun-style SLURM variables
    and the deepspeed launcher: the same losses (to the fp32 round-off of test_loop)."""
    common = ["selection.strategy=full", "train.steps=3", "train.eval_interval=0"]
    runs = {}
    one = str(tmp_path / "one")
    subprocess.run([sys.executable, "-m", "blade", "train", TINY, *tiny_overrides(builtin_data, one),
                    *common, "train.micro_batch_size=8"], check=True, env=_blade_env(), cwd=ROOT, timeout=300)
    runs["single"] = _losses(one)

    torchrun = str(tmp_path / "torchrun")
    subprocess.run(["bash", "launch/local.sh", "2", "-c", TINY, *tiny_overrides(builtin_data, torchrun),
                    *common], check=True, env=_blade_env(), cwd=ROOT, timeout=300)
    runs["torchrun"] = _losses(torchrun)

    slurm, port = str(tmp_path / "slurm"), free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "blade", "train", TINY,
                               *tiny_overrides(builtin_data, slurm), *common],
                              env=_blade_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                                             SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost",
                                             MASTER_PORT=str(port)),
                              cwd=ROOT) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs["slurm-env"] = _losses(slurm)

    ds = str(tmp_path / "ds")
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_accelerators", "2",
                    "--master_port", str(free_port()), "--module", "blade", "train", TINY,
                    *tiny_overrides(builtin_data, ds), *common], check=True, env=_blade_env(), cwd=ROOT,
                   timeout=300)
    runs["deepspeed"] = _losses(ds)

    for name, losses in runs.items():
        assert losses == pytest.approx(runs["single"], rel=1e-5), name
