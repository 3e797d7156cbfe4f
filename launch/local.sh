#!/usr/bin/env bash
# Run blade on N local ranks (one process per rank, gloo on CPU, nccl on GPUs).
#   launch/local.sh N -c CONFIG.yaml [section.key=value ...]                  # blade train
#   launch/local.sh N --cmd bench -c CONFIG.yaml [...] [--steps 10]           # another subcommand
# (BLADE_CMD=bench in the environment does the same as --cmd bench.)
# Uses torch's launcher (torchrun) so every rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*.
set -euo pipefail
N=${1:?usage: launch/local.sh N [--cmd SUBCOMMAND] -c CONFIG [overrides]}; shift
CMD=${BLADE_CMD:-train}
if [ "${1:-}" = "--cmd" ]; then CMD=${2:?--cmd needs a subcommand (train, bench)}; shift 2; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
export DS_ACCELERATOR=${DS_ACCELERATOR:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
. "$ROOT/launch/malloc.sh"; blade_preload_malloc "$DS_ACCELERATOR"   # tcmalloc on CPU (BLADE_MALLOC)
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( $(nproc) / N )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
fi
PORT=${MASTER_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
exec "$PY" -m torch.distributed.run --nproc_per_node "$N" --master_addr 127.0.0.1 --master_port "$PORT" \
  -m blade "$CMD" "$@"
