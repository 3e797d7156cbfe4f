"""`blade eval` (blade/eval/harness.py): lm-evaluation-harness on the real SmolLM2-135M with blade's local
task, offline; the task's items (blade/data/corpus.py continuation_items)."""
import json
from collections import Counter

import pytest

from blade.data.corpus import continuation_items
from blade.errors import BladeError
from tests.test_interop import SMOL, needs_smol, one_line

CHANCE = 0.25            # 4 choices
LIMIT = 24               # items scored: chance's standard error is sqrt(0.25 * 0.75 / 24) = 0.088
MARGIN = 0.3             # required above chance (3.4 standard errors); measured acc_norm 0.8 on 40 items


def test_continuation_items_are_deterministic_and_well_formed():
    items = continuation_items(200, seed=0)
    assert items == continuation_items(200, seed=0) and items != continuation_items(200, seed=1)
    assert continuation_items(10, seed=0) == items[:10]
    for it in items:
        assert len(set(it["choices"])) == 4 and 0 <= it["label"] < 4
        assert it["context"].startswith("How to ") and it["choices"][it["label"]].endswith(".")
    assert min(Counter(it["label"] for it in items).values()) > 30  # the answer's position is not a cue


def test_unknown_task_is_one_line():
    pytest.importorskip("lm_eval", reason="pip install -e .[eval]")
    from blade.eval.harness import evaluate

    with pytest.raises(BladeError, match=r"unknown task blade_continuaton: blade's local tasks are "
                                         r"blade_continuation; the harness's are listed by") as e:
        evaluate(SMOL or "missing.gguf", ["blade_continuaton"], "unused")
    one_line(e)


@pytest.mark.slow  # two conversions and 2 x 96 forward passes of the 135M model (a minute or two on 2 cores)
@needs_smol
def test_blade_eval_on_smollm2_beats_chance_and_repeats(tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="pip install -e .[eval]")
    from blade.cli import main

    accs = []
    for i in range(2):
        out = tmp_path / f"call{i}"
        assert main(["eval", SMOL, "--tasks", "blade_continuation", "--limit", str(LIMIT), "--batch-size", "16",
                     "--device", "cpu", "--out", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())["results"]["blade_continuation"]
        assert results["sample_len"] == LIMIT
        accs.append((results["acc"], results["acc_norm"]))
    assert accs[0] == accs[1]  # the same number from a second call (a fresh conversion and harness run)
    assert accs[0][1] > CHANCE + MARGIN, accs
    assert accs[0][0] > CHANCE, accs  # unnormalised acc too (the short off-target sentences attract it)
    assert "blade_continuation (24 examples): acc " in capsys.readouterr().out
