"""tools/gpu_wheels_check.py finds what breaks a `pip install --no-deps` of a wheel set on the GPU machine;
tools/gpu_summary.py reads the numbers of a real GPU bench.json back correctly."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def _wheel(folder, name, version, requires=(), tag="py3-none-any"):
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    return path


def _check(folder, *wanted):
    return subprocess.run([sys.executable, "tools/gpu_wheels_check.py", str(folder), *wanted], cwd=ROOT,
                          capture_output=True, text=True)


def test_wheel_set_closure_versions_and_tags(tmp_path):
    _wheel(tmp_path, "deepspeed", "0.19.8", ["pydantic>=2.0.0", "torch>=2.0.0", "psutil",
                                             'nvidia-ml-py; sys_platform == "win32"', 'pytest; extra == "dev"'])
    _wheel(tmp_path, "pydantic", "2.14.4", ["pydantic-core==2.50.5"])
    core = _wheel(tmp_path, "pydantic-core", "2.50.5", tag="cp312-cp312-manylinux_2_17_x86_64")
    ok = _check(tmp_path, "deepspeed==0.19.8")
    assert ok.returncode == 0, ok.stderr

    core.unlink()  # a missing dependency of a wheel in the set
    bad = _check(tmp_path, "deepspeed==0.19.8")
    assert bad.returncode == 1 and "pydantic needs pydantic-core==2.50.5: neither in the set" in bad.stderr

    _wheel(tmp_path, "pydantic-core", "2.50.5", tag="cp311-cp311-manylinux_2_17_x86_64")  # wrong Python
    _wheel(tmp_path, "deepspeed", "0.20.0")  # a second version
    bad = _check(tmp_path, "deepspeed==0.19.8")
    assert "does not install on CPython 3.12" in bad.stderr
    assert "two versions of deepspeed" in bad.stderr
    assert "blade needs deepspeed==0.19.8, the set has deepspeed 0.20.0" in bad.stderr


def test_summary_of_the_h200_bench(tmp_path):
    (tmp_path / "old").mkdir()
    shutil.copy(os.path.join(ROOT, "docs/benchmarks/h200-1gpu_2026-11-28/bench.json"), tmp_path / "old")
    (tmp_path / "env.json").write_text(json.dumps({"matmul_bf16_tflops": 780.0}))
    (tmp_path / "runs.txt").write_text("old: exit 0 after 99 s\nz3: skipped, 10 s of the budget left\n")
    out = subprocess.run([sys.executable, "tools/gpu_summary.py", str(tmp_path), "--memory-gib", "139"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "| old | full, blade | 3 | 1 | 8 x 1024 | none | False | False | bf16 |" in out
    # the report of that run: full 0.4416 s, 11.5 % MFU, 113.4 TFLOP/s (14.5 % of 780); blade / full 2.106
    assert "| old | full | 0.442 (0.355-0.480) | 0.442 | 18,550 | 113 | 11.5 % | 14.5 % |" in out
    assert "| old | 2.106 | 2.133 | 0.987 | PASS |" in out
    assert "peak memory blade / full 1.49 measured" in out
    assert "- z3: skipped" in out
