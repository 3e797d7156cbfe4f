"""Check a folder of wheels for the lent GPU machine before it travels there (tools/gpu_wheels.sh).

The machine installs them with `pip install --no-index --no-deps`, so pip checks nothing there: a missing
dependency or a second version shows up only at import time, after minutes of device time. Here:

* one wheel per project, each with a tag CPython 3.12 on manylinux x86_64 accepts;
* the wanted requirements (arguments) and every requirement of every wheel (markers evaluated for
  CPython 3.12 on Linux x86_64, extras off) are met by a wheel of the set at a version the specifier
  allows, or are among DEVICE_IMAGE, the packages of the machine's image that the set relies on.

    python tools/gpu_wheels_check.py .whl "deepspeed==0.19.8" webdataset
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import zipfile
from email.parser import Parser

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

# in the image of the `nvidia-h200` machine (the device tool's package list, read 2026-11-17)
DEVICE_IMAGE = {"torch", "numpy", "packaging", "psutil", "py-cpuinfo", "tqdm", "einops", "msgpack", "ninja",
                "pyyaml", "sentencepiece", "safetensors", "matplotlib"}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + ["manylinux2014_x86_64",
                                                                     "manylinux1_x86_64", "linux_x86_64"]
ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def target_tags() -> set:
    tags = set(cpython_tags((3, 12), platforms=PLATFORMS))
    return tags | set(compatible_tags((3, 12), "cp312", PLATFORMS))


def requirements(path: str) -> list[Requirement]:
    """Requires-Dist of a wheel that apply on the target (no extras)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(z.read(meta).decode())
    reqs = [Requirement(line) for line in headers.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(ENV)]


def check(folder: str, wanted: list[str]) -> list[str]:
    """The problems found (empty: the set is fine)."""
    problems, versions, paths = [], {}, {}
    tags = target_tags()
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        return [f"no wheels in {folder}: run tools/gpu_wheels.sh"]
    for path in wheels:
        name, version, _, wheel_tags = parse_wheel_filename(os.path.basename(path))
        if name in versions:
            problems.append(f"two versions of {name} ({versions[name]}, {version}): keep one")
        versions[name], paths[name] = version, path
        if not wheel_tags & tags:
            problems.append(f"{os.path.basename(path)} does not install on CPython 3.12 manylinux x86_64")
    needs = [(Requirement(w), "blade") for w in wanted]
    needs += [(r, name) for name, path in paths.items() for r in requirements(path)]
    for req, by in needs:
        name = canonicalize_name(req.name)
        if name in versions:
            if req.specifier and not req.specifier.contains(versions[name], prereleases=True):
                problems.append(f"{by} needs {req}, the set has {name} {versions[name]}")
        elif name not in DEVICE_IMAGE:
            problems.append(f"{by} needs {req}: neither in the set nor in the machine's image")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("wanted", nargs="*", help="requirements the set must meet (e.g. deepspeed==0.19.8)")
    args = ap.parse_args()
    problems = check(args.folder, args.wanted)
    for p in problems:
        print(f"gpu_wheels_check: {p}", file=sys.stderr)
    if not problems:
        print(f"gpu_wheels_check: {len(glob.glob(os.path.join(args.folder, '*.whl')))} wheels, "
              "every requirement met by the set or the machine's image")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
