#!/usr/bin/env bash
# Install blade with its test extras into .venv and run the test suite (CPU, a few minutes).
# Extra arguments go to pytest, e.g. tools/run_tests.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh test
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest -q "$@"
