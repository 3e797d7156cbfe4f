"""`blade inspect` on a real run directory: plots and an HTML page of the selected tokens."""
import os

import pytest

from blade.errors import BladeError
from blade.inspect_run import inspect_run
from tests.conftest import tiny_overrides
from tests.dist_harness import run_distributed
from tests.test_loop import _fit


def test_inspect_a_blade_run(tmp_path, builtin_data):
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(builtin_data, run_dir, "selection.strategy=blade", "selection.tau=3",
                               "selection.k_ref_steps=1", "train.steps=6", "selection.diag_interval=3")
    run_distributed(_fit, 2, args=(overrides,), deepspeed=True)
    out = inspect_run(run_dir)
    for name in ("losses.png", "score_hist.png", "dist_u_w.png", "selection_rates.png", "index.html"):
        assert os.path.getsize(os.path.join(out, name)) > 1000, name
    page = open(os.path.join(out, "index.html")).read()
    assert page.count('<span class="sel') > 10 and page.count('<span class="drop') > 5
    assert "score_hist.png" in page


def test_inspect_rejects_a_non_run(tmp_path):
    with pytest.raises(BladeError, match="no metrics.jsonl"):
        inspect_run(str(tmp_path))
