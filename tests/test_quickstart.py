"""The README's first command, end to end: install, built-in corpus, 2-rank BLADE training."""
import os
import subprocess

import pytest

from blade.runtime.metrics import read_metrics
from tests.conftest import ROOT


@pytest.mark.slow
def test_quickstart_trains_and_the_loss_goes_down(tmp_path):
    run_dir = str(tmp_path / "quickstart")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    out = subprocess.run(["bash", "launch/quickstart.sh", "train.steps=45", "train.eval_interval=15",
                          f"run.dir={run_dir}", "logging.wandb=off"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert len(train) == 45 and [r["step"] for r in train] == list(range(45))
    assert train[-1]["loss_all_tokens"] < train[0]["loss_all_tokens"] - 1.0
    assert evals[-1] < evals[0]
    assert any(r["kind"] == "ref" for r in records)            # the BLADE reference phase ran
    assert train[-1]["kept_fraction"] == pytest.approx(0.6, abs=0.01)
    assert "done: 45 steps" in out.stdout
