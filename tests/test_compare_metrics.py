"""tools/compare_metrics.py: timing and file fields are ignored, any other difference is reported."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def _run(tmp_path, name, records):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(d)


def _compare(*dirs):
    return subprocess.run([sys.executable, "tools/compare_metrics.py", *dirs], cwd=ROOT, capture_output=True,
                          text=True)


def test_timing_fields_are_ignored_and_numbers_are_not(tmp_path):
    base = [{"kind": "train", "step": 0, "loss": 1.5, "time_backward_s": 0.1, "step_time_s": 0.3},
            {"kind": "checkpoint", "step": 0, "path": "/a", "size_bytes": 10, "save_time_s": 1.0}]
    same = [{**base[0], "time_backward_s": 0.2, "step_time_s": 0.4}, {**base[1], "path": "/b", "save_time_s": 2}]
    other = [{**base[0], "loss": 1.5000001}, base[1]]
    a, b, c = _run(tmp_path, "a", base), _run(tmp_path, "b", same), _run(tmp_path, "c", other)
    ok = _compare(a, b)
    assert ok.returncode == 0 and "IDENTICAL" in ok.stdout
    bad = _compare(a, c)
    assert bad.returncode == 1 and "loss: 1.5 -> 1.5000001" in bad.stdout
