"""The experiment report (blade/experiment/report.py) on synthetic run directories: the arithmetic of
the selection shares, what `collect` reads, and the tables, verdict and plots of `write_report`."""
import json
import math
import os
import re

import pytest

from blade.errors import BladeError
from blade.experiment.report import collect, selection_shares, write_report

STEPS, TOKENS_PER_STEP, DIAG_EVERY, EVAL_EVERY = 200, 1000, 25, 50
SEEN = {"none": 9000, "spam": 800, "boilerplate": 200}  # tokens per label over the run
SELECTED = {"full": SEEN, "random": {"none": 4500, "spam": 400, "boilerplate": 100},
            "rho1": {"none": 4610, "spam": 300, "boilerplate": 90},
            "blade": {"none": 4840, "spam": 60, "boilerplate": 100}}
SOURCES = {"web": (6000, 1000), "code": (4000, 1000)}  # total, of which noise
# validation loss at the evals (steps 49, 99, 149, 199); random's best is not its final
VAL = {"full": [3.4, 3.25, 3.15, 3.1], "random": [3.4, 3.12, 3.14, 3.15],
       "rho1": [3.35, 3.2, 3.1, 3.05], "blade": [3.3, 3.1, 3.02, 3.0]}
BASE_VAL_LOSS = 3.6
STEP_TIME, REF_TIME = 0.5, 2.0


def _rates(seen: dict, selected: dict, scored: bool = False) -> dict:
    """As SelectionDiagnostics writes them; the mean losses and scores are SIGNALS (None if unscored)."""
    return {k: {"selected": selected[k], "total": seen[k], "rate": selected[k] / seen[k] if seen[k] else None,
                "proxy_loss": SIGNALS.get(k, (None, None))[0] if seen[k] else None,
                "score": SIGNALS.get(k, (None, None))[1] if seen[k] and scored else None}
            for k in seen}


SIGNALS = {"none": (3.125, 0.25), "spam": (5.5, -0.375), "boilerplate": (1.75, -0.125)}  # (l(u), s)


def _hist(mean: float) -> dict:
    edges = [-2 + 0.1 * i for i in range(41)]
    counts = [int(1000 * math.exp(-((a + 0.05 - mean) / 0.4) ** 2)) for a in edges[:-1]]
    return {"edges": edges, "counts": counts}


def write_run(run_dir: str, strategy: str, scored: bool) -> None:
    """A finished run's metrics.jsonl: train, eval, ref, diag and summary records."""
    kept = sum(SELECTED[strategy].values()) / sum(SEEN.values())
    records = [{"kind": "ref", "step": 0, "ref_steps": 10, "ref_phase_time_s": REF_TIME}] if scored else []
    for step in range(STEPS):
        seen, trained = (step + 1) * TOKENS_PER_STEP, round((step + 1) * TOKENS_PER_STEP * kept)
        if (step + 1) % DIAG_EVERY == 0:
            diag = {"kind": "diag", "step": step, "by_label": _rates(SEEN, SELECTED[strategy])}
            if scored:
                diag["score_hist"] = _hist(0.6 - (0.5 if strategy == "blade" else 0.15) * step / STEPS)
            records.append(diag)
        train = {"kind": "train", "step": step, "loss": 3.0, "loss_all_tokens": 3.2, "lr": 1e-4,
                 "tokens_seen": seen, "tokens_trained": trained, "n_valid": TOKENS_PER_STEP,
                 "n_selected": round(TOKENS_PER_STEP * kept), "kept_fraction": kept, "step_time_s": STEP_TIME}
        if scored and (step + 1) % DIAG_EVERY == 0:
            # blade's reference restarts from the proxy every 50 steps, rho1's stays fixed
            train["dist_u_w"] = 0.01 * (step % 50 + 1) if strategy == "blade" else 0.002 * (step + 1)
        records.append(train)
        if (step + 1) % EVAL_EVERY == 0:
            records.append({"kind": "eval", "step": step, "val_loss": VAL[strategy][step // EVAL_EVERY],
                            "val_tokens": 4096, "tokens_seen": seen, "tokens_trained": trained})
    by_source = {s: {"selected": round(t * kept), "total": t, "rate": round(t * kept) / t}
                 for s, (t, _) in SOURCES.items()}
    records.append({"kind": "summary", "step": STEPS - 1, "tokens_seen": STEPS * TOKENS_PER_STEP,
                    "tokens_trained": round(STEPS * TOKENS_PER_STEP * kept),
                    "by_label": _rates({**SEEN, "unused": 0}, {**SELECTED[strategy], "unused": 0}, scored),
                    "by_source": by_source})
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def make_runs(root, strategies=("blade", "full", "rho1", "random")) -> dict:
    runs = {s: os.path.join(str(root), s) for s in strategies}
    for s, d in runs.items():
        write_run(d, s, scored=s in ("rho1", "blade"))
    return runs


META = {"title": "Fake experiment", "command": "python -m tools.experiment --steps 200",
        "setup": ["base model: 2 layers", "pool: 20 % noise"], "steps": STEPS, "gamma": 0.5,
        "data": {"pool_tokens": 10000, "noise_labels": 2}, "wall_time_s": 123.456}


def test_selection_shares_arithmetic():
    shares = selection_shares({"none": {"selected": 60, "total": 80, "rate": 0.75},
                               "spam": {"selected": 5, "total": 20, "rate": 0.25},
                               "gone": {"selected": 0, "total": 0, "rate": None}})
    assert set(shares) == {"none", "spam"}
    spam = shares["spam"]
    assert (spam["seen"], spam["selected"]) == (20, 5)
    assert spam["base_rate"] == pytest.approx(0.2)
    assert spam["selected_rate"] == pytest.approx(5 / 65)
    assert spam["stderr"] == pytest.approx(math.sqrt(0.2 * 0.8 / 65))
    assert spam["enrichment"] == pytest.approx((5 / 65) / 0.2)
    assert shares["none"]["enrichment"] == pytest.approx((60 / 65) / 0.8)
    nothing = selection_shares({"spam": {"selected": 0, "total": 20, "rate": 0.0}})["spam"]
    assert nothing["base_rate"] == 1.0 and nothing["selected_rate"] is None and nothing["enrichment"] is None


def test_collect_reads_the_last_summary_and_prepends_the_base(tmp_path):
    runs = make_runs(tmp_path, ("blade", "full"))
    with open(os.path.join(runs["full"], "metrics.jsonl")) as f:
        lines = f.readlines()
    stale = {"kind": "summary", "step": 99, "tokens_seen": 1, "tokens_trained": 1, "by_label": {},
             "by_source": {}}
    rerun = {"kind": "eval", "step": 49, "val_loss": 3.39, "val_tokens": 4096,
             "tokens_seen": 50 * TOKENS_PER_STEP, "tokens_trained": 50 * TOKENS_PER_STEP}
    with open(os.path.join(runs["full"], "metrics.jsonl"), "w") as f:  # a stale summary; an eval logged twice
        f.writelines([json.dumps(stale) + "\n"] + [line for line in lines if '"eval"' not in line]
                     + [json.dumps(rerun) + "\n", json.dumps({**rerun, "val_loss": 3.41}) + "\n"])

    results = collect(runs, BASE_VAL_LOSS)
    assert list(results["strategies"]) == ["full", "blade"]  # the fixed order, not the given one
    assert results["base_val_loss"] == BASE_VAL_LOSS
    full, blade = results["strategies"]["full"], results["strategies"]["blade"]
    assert full["tokens_seen"] == full["tokens_trained"] == STEPS * TOKENS_PER_STEP
    assert full["curve"] == [[0, 0, BASE_VAL_LOSS], [50_000, 50_000, 3.41]]
    assert full["final_val_loss"] == full["best_val_loss"] == 3.41  # the base point is no eval of the run
    kept = sum(SELECTED["blade"].values()) / sum(SEEN.values())
    assert blade["curve"][0] == [0, 0, BASE_VAL_LOSS]
    assert blade["curve"][-1] == [200_000, round(200_000 * kept), 3.0]
    assert (blade["final_val_loss"], blade["best_val_loss"]) == (3.0, 3.0)
    assert set(blade["shares"]) == set(SEEN)
    assert blade["shares"]["spam"]["selected_rate"] == pytest.approx(60 / sum(SELECTED["blade"].values()))
    assert blade["source_rates"]["web"] == pytest.approx(round(6000 * kept) / 6000)
    assert [h["step"] for h in blade["score_hists"]] == list(range(DIAG_EVERY - 1, STEPS, DIAG_EVERY))
    assert len(blade["score_hists"][0]["edges"]) == 41 and len(blade["score_hists"][0]["counts"]) == 40
    assert blade["dist_u_w"][0] == [24, 0.25]
    assert blade["wall_time_s"] == pytest.approx(STEPS * STEP_TIME + REF_TIME)
    assert full["score_hists"] == [] and full["dist_u_w"] == []
    assert collect(runs, None)["strategies"]["full"]["curve"] == [[50_000, 50_000, 3.41]]
    json.dumps(results)


def test_collect_rejects_an_unfinished_run(tmp_path):
    runs = make_runs(tmp_path, ("full",))
    with open(os.path.join(runs["full"], "metrics.jsonl")) as f:
        lines = [line for line in f if '"summary"' not in line]
    with open(os.path.join(runs["full"], "metrics.jsonl"), "w") as f:
        f.writelines(lines)
    with pytest.raises(BladeError, match="no summary record"):
        collect(runs, None)


def _table_rows(md: str, heading: str) -> dict:
    """First column -> cells of the table under the heading."""
    section = md.split(heading, 1)[1].split("\n\n#", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    return {r[0]: r[1:] for r in rows[2:]}


def test_write_report_tables_verdict_and_plots(tmp_path):
    results = collect(make_runs(tmp_path / "runs"), BASE_VAL_LOSS)
    out = str(tmp_path / "report")
    path = write_report(out, results, META)
    assert path == os.path.join(out, "report.md")
    for name in ("val_loss.png", "selection_rates.png", "score_hist.png", "dist_u_w.png"):
        assert os.path.getsize(os.path.join(out, name)) > 5000, name
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["meta"] == META and saved["strategies"]["blade"]["final_val_loss"] == 3.0
    md = open(path).read()
    assert md.startswith("# Fake experiment") and "```\npython -m tools.experiment --steps 200\n```" in md
    assert "- base model: 2 layers\n- pool: 20 % noise\n" in md and "3.6000" in md
    assert "gamma" not in md  # meta beyond the setup lines goes to results.json only

    table3 = _table_rows(md, "## Table 3")  # l(u) of every strategy, then the scores of rho1 and blade
    assert list(table3) == ["clean", "spam", "boilerplate"]
    assert table3["spam"] == ["5.500"] * 4 + ["-0.375"] * 2 and table3["clean"][4:] == ["0.250", "0.250"]

    table1 = _table_rows(md, "## Table 1")
    assert list(table1) == ["full", "random", "rho1", "blade"]
    assert table1["blade"][0] == "**3.0000**" and [r[0] for r in table1.values()].count("**3.0000**") == 1
    assert table1["random"][:3] == ["3.1500", "3.1200", "+0.0500"]
    assert table1["blade"][2] == f"{3.0 - 3.1:+.4f}" == "-0.1000" and table1["full"][2] == "+0.0000"
    assert table1["full"][3:] == ["200,000", "200,000", f"{STEPS * STEP_TIME:.1f}"]
    assert table1["rho1"][5] == f"{STEPS * STEP_TIME + REF_TIME:.1f}"

    table2 = _table_rows(md, "## Table 2")
    assert list(table2) == ["clean", "spam", "boilerplate"]  # clean first, then by base rate
    n_sel = sum(SELECTED["blade"].values())
    spam_base = SEEN["spam"] / sum(SEEN.values())
    two_se = 200 * math.sqrt(spam_base * (1 - spam_base) / n_sel)  # percentage points
    assert table2["spam"][0] == f"{100 * spam_base:.2f} % ± {two_se:.2f}" == "8.00 % ± 0.77"
    blade_spam = 60 / n_sel
    assert table2["spam"][4] == f"{100 * blade_spam:.2f} % ({blade_spam / spam_base:.2f}×)"
    assert table2["spam"][4] == "1.20 % (0.15×)"
    assert table2["spam"][1] == "8.00 % (1.00×)"  # full selects every token
    sources = _table_rows(md, "### Selection rate per source")
    assert sources["web"][0] == "100.00 %" and sources["all sources"][2] == "50.00 %"

    for name in ("val_loss", "selection_rates", "score_hist", "dist_u_w"):
        assert f"]({name}.png)" in md
    verdict = md.split("## Verdict", 1)[1]
    assert "Lowest final target validation loss: **blade** (3.0000)" in verdict
    assert "blade's final target validation loss is 3.0000, 0.0500 lower than rho1's (3.0500)." in verdict
    assert "0.1500 lower than random's (3.1500)" in verdict and "0.1000 lower than full's" in verdict
    assert "blade beats rho1 on final target validation loss: yes (blade − rho1 = -0.0500)." in verdict
    # rho1: spam 6 % vs 8 % base, 2 s.e. = 0.77 points -> below; random matches the base rates exactly
    assert re.search(r"Labels rho1 selects below .*: spam \(6\.00 % vs 8\.00 %\)\.", verdict)
    assert re.search(r"Labels blade selects below .*: spam \(1\.20 % vs 8\.00 %\)\.", verdict)
    assert re.search(r"Labels random selects below .*: none\.", verdict)
    assert "Labels full selects" not in verdict

    results["strategies"]["blade"]["final_val_loss"] = 3.06  # now rho1 wins
    md = open(write_report(str(tmp_path / "report2"), results, META)).read()
    assert _table_rows(md, "## Table 1")["rho1"][0] == "**3.0500**"
    assert "Lowest final target validation loss: **rho1** (3.0500)" in md
    assert "rho1's final target validation loss is 3.0500, 0.0100 lower than blade's (3.0600)." in md
    assert "blade beats rho1 on final target validation loss: no (blade − rho1 = +0.0100)." in md


def test_write_report_skips_plots_without_data(tmp_path):
    results = collect(make_runs(tmp_path / "runs", ("full", "random")), None)
    out = tmp_path / "report"
    out.mkdir()
    (out / "score_hist.png").write_bytes(b"stale")  # from an earlier report of other runs
    md = open(write_report(str(out), results, {"command": "x"})).read()
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json", "selection_rates.png",
                                                      "val_loss.png"]
    assert "score_hist.png" not in md and "dist_u_w.png" not in md and "](val_loss.png)" in md
    assert "blade beats rho1" not in md
    assert "Lowest final target validation loss: **full** (3.1000)" in md
    assert "full's final target validation loss is 3.1000, 0.0500 lower than random's (3.1500)." in md
