"""Shared fixtures: the built-in corpus, prepared once per session at a small scale."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_test.yaml")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of a minute or more")


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory) -> str:
    """The built-in corpus (30 % scale), tokenised with a 512-piece model into 64-token sequences."""
    from blade.data.corpus import generate_builtin_corpus
    from blade.data.prepare import prepare_splits

    out = str(tmp_path_factory.mktemp("builtin"))
    raw = os.path.join(out, "raw")
    generate_builtin_corpus(raw, seed=0, scale=0.3)
    prepare_splits({name: [os.path.join(raw, f"{src}.jsonl")] for name, src in
                    (("train", "pool"), ("target", "target"), ("val", "val"))},
                   out, seq_len=64, vocab_size=512)
    return out


def tiny_overrides(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    return [f"data.train={data_dir}/train", f"data.target={data_dir}/target", f"data.val={data_dir}/val",
            f"run.dir={run_dir}", "model.vocab_size=512", *extra]


def tcmalloc_path() -> str:
    """Where launch/malloc.sh finds libtcmalloc_minimal.so.4 ("" when it is not installed)."""
    import subprocess

    found = subprocess.run(["bash", "-c", ". launch/malloc.sh; blade_find_tcmalloc"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    return found.stdout.strip() if found.returncode == 0 else ""
