"""The report over seeds and grid points (blade/experiment/study.py) on synthetic run directories:
its statistics against a hand computation, the generated verdict, and that one seed without a grid
keeps the single-run report."""
import json
import math
import os

import pytest

from blade.experiment.study import write_reports

BASE = 4.0
# final target validation loss per run and seed; blade[lam=0] is lower than rho1 on every seed by a
# steady margin (beyond noise), blade scatters around rho1 (within noise)
FINAL = {"full": {1: 3.50, 2: 3.54, 3: 3.47}, "rho1": {1: 3.45, 2: 3.50, 3: 3.44},
         "blade": {1: 3.47, 2: 3.48, 3: 3.46}, "blade[lam=0]": {1: 3.40, 2: 3.44, 3: 3.40}}
STRATEGY = {"full": "full", "rho1": "rho1", "blade": "blade", "blade[lam=0]": "blade"}


def _write(run_dir: str, final: float, strategy: str, seed: int) -> None:
    kept = 1.0 if strategy == "full" else 0.6
    seen, trained = 1000, round(1000 * kept)
    labels = {"none": {"selected": round(900 * kept) + (5 if strategy == "blade" else 0), "total": 900},
              "spam": {"selected": round(100 * kept) - (5 if strategy == "blade" else 0), "total": 100}}
    records = [{"kind": "train", "step": s, "step_time_s": 1.0 + seed / 10, "tokens_seen": 100 * (s + 1)}
               for s in range(10)]
    records += [{"kind": "eval", "step": 4, "val_loss": final + 0.2, "tokens_seen": 500, "tokens_trained": 250},
                {"kind": "eval", "step": 9, "val_loss": final, "tokens_seen": seen, "tokens_trained": trained},
                {"kind": "summary", "step": 9, "tokens_seen": seen, "tokens_trained": trained, "by_label": labels,
                 "by_source": {"web": {"selected": trained, "total": seen, "rate": kept}}}]
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _rows(root, finals: dict) -> dict:
    versus = {"full": "full", "rho1": "rho1", "blade": "blade"}
    rows = {}
    for label, by_seed in finals.items():
        runs = {}
        for seed, loss in by_seed.items():
            runs[seed] = os.path.join(str(root), f"{label}-{seed}")
            _write(runs[seed], loss, STRATEGY[label], seed)
        rows[label] = {"strategy": STRATEGY[label], "runs": runs, "versus": versus}
    return rows


def test_statistics_match_a_hand_computation(tmp_path):
    path = write_reports(str(tmp_path / "report"), _rows(tmp_path, FINAL), [1, 2, 3], BASE,
                         {"command": "blade experiment --seeds 3", "seeds": [1, 2, 3]})
    out = json.load(open(tmp_path / "report" / "results.json"))["rows"]
    for label, by_seed in FINAL.items():
        xs = list(by_seed.values())
        m = sum(xs) / 3
        se = math.sqrt(sum((x - m) ** 2 for x in xs) / 2 / 3)
        assert out[label]["final"]["mean"] == pytest.approx(m) and out[label]["final"]["se"] == pytest.approx(se)
        assert out[label]["best"]["mean"] == pytest.approx(m)  # the last eval is the lowest here
        wall = sum(10 * (1.0 + s / 10) for s in by_seed) / 3
        assert out[label]["s_per_nat"] == pytest.approx(wall / (BASE - m))
    diffs = [FINAL["blade[lam=0]"][s] - FINAL["rho1"][s] for s in (1, 2, 3)]
    d = sum(diffs) / 3
    se = math.sqrt(sum((x - d) ** 2 for x in diffs) / 2 / 3)
    c = out["blade[lam=0]"]["vs_rho1"]
    assert c["against"] == "rho1" and c["mean"] == pytest.approx(d) and c["se"] == pytest.approx(se)
    t = d / se
    assert c["t"] == pytest.approx(t) and c["p_t"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2))
    assert c["p_sign"] == 0.25 and c["lower"] == 3
    assert "vs_rho1" not in out["rho1"] and "vs_full" not in out["full"] and "vs_rho1" in out["blade"]

    report = open(path).read()
    row = f"| blade[lam=0] | rho1 | {d:.4f} ± {se:.4f} | {se * math.sqrt(3):.4f} | 3/3 | {c['p_t']:.3f} | 0.250 |"
    assert row + " lower, beyond noise |" in report
    assert "BLADE beats RHO-1 beyond noise (paired t-test p < 0.05) at: blade[lam=0]." in report
    assert "blade − rho1 = " in report and ": within noise." in report
    assert "sign test cannot go below 0.250" in report
    assert "Table 3: enrichment per label" in report and "Table 4: selection rate per source" in report
    for name in ("val_loss_bands.png", "final_loss.png", "seed1/report.md", "seed3/val_loss.png"):
        assert (tmp_path / "report" / name).is_file(), name


def test_no_setting_beating_rho1_is_said(tmp_path):
    finals = {k: v for k, v in FINAL.items() if k != "blade[lam=0]"}
    path = write_reports(str(tmp_path / "report"), _rows(tmp_path, finals), [1, 2, 3], None, {"seeds": [1, 2, 3]})
    report = open(path).read()
    assert "No BLADE setting beats RHO-1 beyond noise" in report
    assert "start model target validation loss" not in report  # no base stage (--init-from): no cost per nat
    assert json.load(open(tmp_path / "report" / "results.json"))["rows"]["blade"]["s_per_nat"] is None


def test_one_seed_without_grid_keeps_the_single_run_report(tmp_path):
    finals = {k: {1: v[1]} for k, v in FINAL.items() if k != "blade[lam=0]"}
    write_reports(str(tmp_path / "report"), _rows(tmp_path, finals), [1], BASE, {})
    results = json.load(open(tmp_path / "report" / "results.json"))
    assert set(results["strategies"]) == {"full", "rho1", "blade"} and not (tmp_path / "report" / "seed1").exists()
