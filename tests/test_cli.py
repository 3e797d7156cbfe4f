"""The `blade` command line: dry run, one-line errors, prepare."""
import json
import os
import subprocess
import sys

from blade.cli import main, split_config_args
from tests.conftest import ROOT, TINY, tiny_overrides


def blade(*args, env=None):
    return subprocess.run([sys.executable, "-m", "blade", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_split_config_args():
    assert split_config_args(["a.yaml", "x.y=1"], None) == ("a.yaml", ["x.y=1"])
    assert split_config_args(["x.y=1"], "a.yaml") == ("a.yaml", ["x.y=1"])
    assert split_config_args([], None) == (None, [])


def test_dry_run_prints_config_and_layout(builtin_data, tmp_path):
    out = blade("train", TINY, *tiny_overrides(builtin_data, str(tmp_path / "r")), "train.grad_accum=2",
                "--dry-run", env={"WORLD_SIZE": "2"})
    assert out.returncode == 0, out.stderr
    assert "strategy: blade" in out.stdout and "micro_batch_size: 4" in out.stdout
    # 2 ranks x 4 sequences x 2 accumulation x 64 tokens (the prepared seq_len, not max_seq_len)
    assert "1,024" in out.stdout
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_bad_config_is_one_line_error(capsys):
    assert main(["train", TINY, "selection.gama=0.5", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'selection.gamma'" in err[0]
    out = blade("train", TINY, "data.train=/nonexistent")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("blade: error: config error: data.train")
    assert "Traceback" not in out.stderr


def test_prepare_cli(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document {i} says hello world to the reader."})
                             for i in range(200)))
    out = blade("prepare", str(src), "--out", str(tmp_path / "d"), "--seq-len", "16", "--vocab-size", "300")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["seq_len"] == 16 and manifest["num_sequences"] > 0
    missing = blade("prepare", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "e"))
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr and "Traceback" not in missing.stderr
