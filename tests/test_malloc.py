"""The C allocator: which one a process runs on (blade/runtime/malloc.py), that the bench's memory probe
can make it return freed memory, and the launchers' choice of it (launch/malloc.sh)."""
import os
import subprocess
import sys

import pytest

from blade import ROOT
from tests.conftest import tcmalloc_path


def _bash(script: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "BLADE_MALLOC")}
    return subprocess.run(["bash", "-c", f". launch/malloc.sh; {script}"], cwd=ROOT, capture_output=True,
                          text=True, env={**base, **env}, timeout=60)


def _tcmalloc() -> str:
    lib = tcmalloc_path()
    if not lib:
        pytest.skip("libtcmalloc_minimal.so.4 is not installed (apt-get install libtcmalloc-minimal4)")
    return lib


RSS_AFTER_FREE = """
import torch
from blade.runtime import malloc
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
steered = malloc.return_freed_memory() if STEER else None
base = rss()
held = [torch.ones(1 << 20) for _ in range(64)]  # 256 MiB in 4 MiB tensors
grown = rss() - base
del held
print(malloc.active_allocator(), steered, grown >> 20, (rss() - base) >> 20)
"""


def _rss_after_free(steer: bool, preload: str = "") -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    out = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE.replace("STEER", str(steer))], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_steered_glibc_returns_freed_tensors():
    name, steered, grown, left = _rss_after_free(True)
    assert (name, steered) == ("glibc", "True") and int(grown) >= 250 and int(left) < 16


def test_tcmalloc_keeps_freed_memory_until_steered():
    lib = _tcmalloc()
    name, _, grown, left = _rss_after_free(False, lib)
    assert name == "tcmalloc" and int(grown) >= 250 and int(left) >= 250  # cached: why the probe steers it
    name, steered, grown, left = _rss_after_free(True, lib)
    assert (name, steered) == ("tcmalloc", "True") and int(grown) >= 250 and int(left) < 16


def test_launcher_preloads_tcmalloc_on_cpu_only():
    lib = _tcmalloc()
    show = 'blade_preload_malloc "$DEV" && echo "preload=${LD_PRELOAD:-}"'
    assert _bash(show, DEV="cpu").stdout.strip() == f"preload={lib}"
    assert _bash(show, DEV="cuda").stdout.strip() == "preload="
    assert _bash(show, DEV="cuda", BLADE_MALLOC="tcmalloc").stdout.strip() == f"preload={lib}"
    assert _bash(show, DEV="cpu", BLADE_MALLOC="system").stdout.strip() == "preload="
    mine = "/opt/libjemalloc.so.2"  # a user's own choice of allocator is kept
    assert _bash(show, DEV="cpu", LD_PRELOAD=mine).stdout.strip() == f"preload={mine}"


def test_launcher_without_tcmalloc_notes_or_refuses():
    missing = "blade_find_tcmalloc() { return 1; }; "
    show = missing + 'blade_preload_malloc cpu; echo "rc=$? preload=${LD_PRELOAD:-}"'
    out = _bash(show)
    assert out.stdout.strip() == "rc=0 preload=" and "libtcmalloc-minimal4" in out.stderr
    out = _bash(show, BLADE_MALLOC="tcmalloc")
    assert out.stdout.strip() == "rc=2 preload=" and out.stderr.count("\n") == 1
    assert "apt-get install libtcmalloc-minimal4" in out.stderr
    out = _bash(show, BLADE_MALLOC="tcmaloc")
    assert out.stdout.strip() == "rc=2 preload=" and "not one of auto, tcmalloc, system" in out.stderr
