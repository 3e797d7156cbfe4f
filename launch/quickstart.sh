#!/usr/bin/env bash
# The quickstart: install, build the built-in corpus (no download), train BLADE on 2 local CPU ranks.
# Extra arguments are config overrides, e.g. launch/quickstart.sh train.steps=40
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
# (re)build the corpus when it is missing or was written in an older shard format
grep -qs '"blade-shards/2"' data/builtin/train/manifest.json || .venv/bin/blade prepare --builtin data/builtin
# checkpoint.resume=auto: running it again continues runs/quickstart (delete it to start over)
launch/local.sh "${RANKS:-2}" -c configs/quickstart.yaml checkpoint.resume=auto "$@"
