#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels that tools/gpu_check.sh installs on the lent GPU machine.
# That machine has no network; its image (CPython 3.12, torch, numpy, pyyaml, psutil, ninja, ...) lacks
# DeepSpeed, webdataset and DeepSpeed's pydantic stack. Run this here, where pip reaches PyPI:
#   tools/gpu_wheels.sh            # download + build (about 20 s, a few MiB), then check
#   tools/gpu_wheels.sh --check    # only check an existing .whl/ (no network; gpu_check.sh --dry-run)
# DeepSpeed comes from its sdist as a pure-Python wheel (DS_BUILD_OPS=0: no compiled ops; blade needs none),
# built against this .venv's torch without build isolation, so pip never resolves a torch of its own.
# The others are the versions this .venv runs, as CPython 3.12 manylinux x86_64 or pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
DEEPSPEED=0.19.8
PINNED=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
TARGET=(--python-version 3.12 --implementation cp "${PLATFORMS[@]}")
# what blade imports from the set (the rest of the set is what these need)
NEEDED=("deepspeed==$DEEPSPEED" webdataset)

check() {  # the set installs for CPython 3.12 with --no-deps, and its requirements close over it
  [ -n "$(ls "$DEST"/*.whl 2>/dev/null)" ] || { echo "gpu_wheels: no wheels in $DEST: run tools/gpu_wheels.sh" >&2; exit 1; }
  "$PY" tools/gpu_wheels_check.py "$DEST" "${NEEDED[@]}"
  local site; site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: "${TARGET[@]}" \
    --target "$site" "$DEST"/*.whl
  echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels install into a CPython 3.12 target ($(du -sh "$DEST" | cut -f1) in $DEST)"
  rm -rf "$site"
}

if [ "${1:-}" = --check ]; then check; exit 0; fi
rm -rf "$DEST"; mkdir -p "$DEST"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$DEST" \
  "deepspeed==$DEEPSPEED"
"$PY" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "${PINNED[@]}"
check
