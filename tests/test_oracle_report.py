"""The oracle's tables and plots (blade/experiment/oracle_report.py, blade/inspect_run.py) on synthetic
`oracle` records: the arithmetic, and that `blade inspect` and the experiment report show them."""
import json
import os

import pytest

from blade.experiment.oracle_report import oracle_table, since_table, summarise, write_oracle_report
from blade.experiment.report import collect, write_report
from blade.inspect_run import inspect_run, plot_oracle
from tests.test_experiment_report import BASE_VAL_LOSS, META, make_runs


def _record(step, since, sp, dl_own, dl_random, dl_oracle, strategy="blade"):
    return {"kind": "oracle", "step": step, "strategy": strategy, "since_reference": since, "n_valid": 100,
            "k": 60, f"spearman_{strategy}": sp, f"precision_{strategy}": 0.7, "spearman_loss": -0.1,
            "precision_loss": 0.55, "spearman_random": 0.0, "precision_random": 0.6,
            "dl_oracle": dl_oracle, f"dl_{strategy}": dl_own, "dl_random": dl_random, "dl_loss": dl_random,
            "dl_full": dl_random, f"fo_gain_{strategy}": 0.5, "fo_gain_loss": 0.1, "fo_gain_full": 0.0}


ROWS = [_record(0, 0, 0.4, -0.03, -0.02, -0.04), _record(10, 10, 0.2, -0.02, -0.02, -0.025),
        _record(20, 0, 0.3, -0.01, -0.01, -0.016)]


def test_summary_arithmetic_and_tables():
    s = summarise(ROWS)
    assert s["own"] == "blade" and s["measurements"] == 3 and s["gamma"] == pytest.approx(0.6)
    assert s["spearman_blade"] == pytest.approx(0.3)
    assert s["spearman_by_since"] == {0: pytest.approx(0.35), 10: pytest.approx(0.2)}
    # the realised gain is a ratio of means: (0.01 + 0 + 0) / (0.02 + 0.005 + 0.006)
    assert s["gain_blade"] == pytest.approx(0.01 / 0.031)
    assert s["dl_vs_random_oracle"] == pytest.approx(-0.031 / 3)
    row = oracle_table({"blade": {"oracle": ROWS}, "full": {"oracle": []}})
    assert len(row) == 3 and row[2].startswith("| blade | 3 | +0.300 ± 0.058 | -0.100 | +0.000 | 0.700 (0.60) |")
    assert row[2].endswith("| +0.32 |")
    assert since_table({"blade": {"oracle": ROWS}})[2] == "| blade | +0.35 | +0.20 |"
    full = {k: v for k, v in _record(0, None, 0.1, 0, 0, 0, "full").items() if not k.endswith("_full")}
    assert oracle_table({"full": {}}) == [] and summarise([full])["own"] == "loss"  # full has no scores


def _add_oracle(run_dir, rows):
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_inspect_and_the_experiment_report_show_the_oracle(tmp_path):
    runs = make_runs(tmp_path / "runs", ("blade", "random"))
    assert not plot_oracle([], str(tmp_path / "none.png"))
    _add_oracle(runs["blade"], ROWS)
    _add_oracle(runs["random"], [_record(0, None, 0.01, -0.02, -0.02, -0.04, "random")])
    out = inspect_run(runs["blade"], str(tmp_path / "inspect"))
    assert os.path.exists(os.path.join(out, "oracle.png")) and "oracle.png" in open(os.path.join(out, "index.html")).read()
    report = write_report(str(tmp_path / "report"), collect(runs, BASE_VAL_LOSS), META)
    text = open(report).read()
    assert "## Table 4: against the exact one-step choice" in text and "![Spearman with the exact" in text
    assert "| blade | 3 | +0.300 ± 0.058 |" in text and "| random | 1 | +0.000 | -0.100 |" in text
    assert os.path.exists(tmp_path / "report" / "oracle.png")
    md = write_oracle_report(runs, str(tmp_path / "study"), command="tools/oracle_study.py")
    assert "tools/oracle_study.py" in open(md).read()
    assert os.path.exists(tmp_path / "study" / "oracle_runs.png") and os.path.exists(tmp_path / "study" / "oracle_blade.png")


def test_a_report_without_oracle_records_has_no_table(tmp_path):
    runs = make_runs(tmp_path / "runs", ("blade", "full"))
    text = open(write_report(str(tmp_path / "report"), collect(runs, BASE_VAL_LOSS), META)).read()
    assert "Table 4" not in text and not os.path.exists(tmp_path / "report" / "oracle.png")
