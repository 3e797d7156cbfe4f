#!/usr/bin/env bash
# The one GPU check of issues 13 and 15, for a lent GPU machine without network (docs/benchmarks/README.md
# "GPU check"): install the carried wheels, take or prepare the built-in corpus, `blade plan` and
# `blade bench` the TinyLlama-1.1B shape (bf16, 1 GPU), write a summary.
#   tools/gpu_check.sh [RESULTS]            on the GPU; RESULTS defaults to $OUT, else runs/gpu_check
#   tools/gpu_check.sh --dry-run [RESULTS]  the same sequence on this CPU: tiny model, one rank, gloo, and
#                                           the wheels installed into a scratch CPython 3.12 target
# The runs, most important first; each starts only while the budget has room for it:
#   ac3    full,blade  ZeRO-3, activation checkpointing: peak memory blade/full, measured vs plan (13)
#   best   full,blade  ZeRO-1, compile, fused AdamW, --profile: full-CE MFU, BLADE/full vs floor (15)
#   eager  full        ZeRO-1, no compile, torch's AdamW loop: what compile and the fused step give
#   z3     full        ZeRO-3, compile, fused AdamW: the ZeRO stage on one GPU
# RESULTS gets three files (the device tool returns at most eight): summary.md, results.tar.gz (every
# run's report.md, bench.json, breakdown.png, profile tables, plans, log tails; rewritten after each run,
# so a killed check keeps what finished) and gpu_check.log. Traces and run folders stay in GPU_CHECK_WORK.
# Environment: BUDGET_S (seconds for the whole check; GPU 420, dry 300), GPU_CHECK_DATA (a corpus from
# `blade prepare --builtin DIR --seq-len 2048 --scale 2`, default .gpudata; prepared here when absent),
# GPU_CHECK_WORK (default /tmp/gpu_check), PYTHON, BLADE_GIT (the commit, recorded; the device has no .git).
set -uo pipefail  # no -e: a failed run is reported and the next one still runs
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${DRY:-0}
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; fi
RESULTS=$(mkdir -p "${1:-${OUT:-runs/gpu_check}}" && cd "${1:-${OUT:-runs/gpu_check}}" && pwd)
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
rm -rf "$WORK"; mkdir -p "$WORK/logs"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
TEE=$!
T0=$SECONDS
RESERVE_S=25  # the summary and the last pack

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  BUDGET_S=${BUDGET_S:-300}; export DS_ACCELERATOR=cpu
  CFG=configs/tiny_test.yaml; SEQ=64; SCALE=0.1; MB=4; MB_AC=8; MEM_GIB=4
  MODEL=(model.max_seq_len=$SEQ train.precision=bf16); PLAN_FLAGS=(--cpu)
else
  PY=${PYTHON:-python3}
  BUDGET_S=${BUDGET_S:-420}; export DS_ACCELERATOR=cuda
  CFG=configs/tinyllama-1.1b.yaml; SEQ=2048; SCALE=2; MB=16; MB_AC=16; MEM_GIB=
  MODEL=(model.vocab_size=2048 model.max_seq_len=$SEQ); PLAN_FLAGS=()
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/gpu_check_te} PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation
# a JIT build killed by a timeout leaves its lock behind, and the next build waits on it for ever
find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null
say() { printf '[gpu_check %4ds] %s\n' $((SECONDS - T0)) "$*"; }

# ---------------------------------------------------------------- 1. install the carried wheels
SITE=${GPU_CHECK_SITE:-/tmp/site}
if [ "$DRY" = 1 ]; then
  tools/gpu_wheels.sh --check || { say "the wheel set in .whl/ is broken (above): run tools/gpu_wheels.sh"; exit 1; }
  export PYTHONPATH=$ROOT
else
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { say "installing .whl/*.whl failed: build them with tools/gpu_wheels.sh and carry .whl"; exit 1; }
  export PYTHONPATH=$SITE:$ROOT
fi
"$PY" -c "import deepspeed, webdataset, blade.cli" || { say "blade does not import (above)"; exit 1; }
say "installed; python $("$PY" -c 'import platform; print(platform.python_version())')"

# ---------------------------------------------------------------- 2. the machine
"$PY" - "$WORK/env.json" "${BLADE_GIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" <<'EOF'
import json, platform, subprocess, sys, torch
env = {"git": sys.argv[2], "python": platform.python_version(), "torch": torch.__version__}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env["device"], env["memory_gib"] = p.name, round(p.total_memory / 2**30, 1)
    env["nvidia-smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,"
                                        "clocks.max.sm,power.draw,power.limit", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    n = 8192  # the bf16 matmul ceiling on random data: median of 20 timed products
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    env["matmul_bf16_tflops"] = round(2 * n**3 / sorted(times)[len(times) // 2] / 1e12, 1)
else:
    env["device"] = "cpu (dry run)"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
[ -n "$MEM_GIB" ] || MEM_GIB=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['memory_gib'])" "$WORK/env.json")

# ---------------------------------------------------------------- 3. data
DATA=${GPU_CHECK_DATA:-.gpudata}
if ! "$PY" -c "import json,sys; sys.exit(json.load(open(sys.argv[1]))['seq_len'] != $SEQ)" "$DATA/train/manifest.json" 2>/dev/null; then
  DATA=$WORK/data
  say "preparing the built-in corpus (seq $SEQ, scale $SCALE) in $DATA"
  "$PY" -m blade prepare --builtin "$DATA" --seq-len "$SEQ" --scale "$SCALE" >"$WORK/logs/prepare.log" 2>&1 \
    || { tail -n 20 "$WORK/logs/prepare.log"; say "blade prepare failed"; exit 1; }
fi
say "data: $DATA"
BASE=("${MODEL[@]}" data.train=$DATA/train data.target=$DATA/target data.val=$DATA/val
      train.grad_accum=1 selection.tau=10 selection.k_ref_steps=3)

pack() {  # the small outputs of WORK into RESULTS/results.tar.gz
  (cd "$WORK" && for f in logs/*.log; do [ -e "$f" ] && tail -n 400 "$f" >"${f%.log}.tail"; done
   find . -path ./data -prune -o \( -name report.md -o -name bench.json -o -name breakdown.png \
     -o -name '*_top_ops.txt' -o -name '*.tail' -o -name '*.txt' -o -name env.json \) -print \
     | grep -v '/runs/' | tar -czf "$RESULTS/results.tar.gz" -T -)
}

# ---------------------------------------------------------------- 4. plan (predictions, no ranks)
mkdir -p "$WORK/plans"
for strategy in full blade; do
  "$PY" -m blade plan "$CFG" "${BASE[@]}" deepspeed.zero_stage=3 model.activation_checkpointing=full \
    train.micro_batch_size=$MB_AC selection.strategy=$strategy --ranks 1 --memory-gib "$MEM_GIB" \
    "${PLAN_FLAGS[@]}" | tee "$WORK/plans/ac3_$strategy.txt"
done

# ---------------------------------------------------------------- 5. bench
FAILED=0
bench() {  # bench NAME STRATEGIES GPU_S DRY_S [FLAG ...] -- [OVERRIDE ...]; *_S: about what it needs
  local name=$1 strategies=$2 need=$([ "$DRY" = 1 ] && echo "$4" || echo "$3") flags=() rc t=$SECONDS
  shift 4
  while [ "$1" != -- ]; do flags+=("$1"); shift; done; shift
  local left=$(( BUDGET_S - RESERVE_S - (SECONDS - T0) ))
  if [ "$left" -lt "$need" ]; then
    echo "$name: skipped, $left s of the budget left and it needs about $need s" | tee -a "$WORK/runs.txt"
    return
  fi
  say "bench $name ($strategies; $*)"
  timeout -k 15 $(( left < 2 * need ? left : 2 * need )) "$PY" -m blade bench -c "$CFG" "${BASE[@]}" "$@" \
    --strategies "$strategies" --warmup 2 --steps 5 --no-checkpoint --out "$WORK/$name" "${flags[@]}" \
    >"$WORK/logs/$name.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  tail -n 12 "$WORK/logs/$name.log"
  echo "$name: exit $rc after $((SECONDS - t)) s" | tee -a "$WORK/runs.txt"
  pack
}
bench ac3 full,blade 90 30 -- deepspeed.zero_stage=3 model.activation_checkpointing=full train.micro_batch_size=$MB_AC
bench best full,blade 150 90 --profile -- deepspeed.zero_stage=1 train.compile=true optim.fused=true \
  train.micro_batch_size=$MB
bench eager full 50 30 -- deepspeed.zero_stage=1 train.micro_batch_size=$MB
bench z3 full 80 60 -- deepspeed.zero_stage=3 train.compile=true optim.fused=true train.micro_batch_size=$MB

# ---------------------------------------------------------------- 6. summary
"$PY" tools/gpu_summary.py "$WORK" --memory-gib "$MEM_GIB" >"$RESULTS/summary.md" \
  || say "the summary failed (above); results.tar.gz has the raw outputs"
pack
cat "$RESULTS/summary.md"
say "done; results in $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')"
exec >&- 2>&-; wait "$TEE"  # the log is complete before the device tool collects RESULTS
exit $(( FAILED > 0 ))  # 1 when a run failed (skipped ones do not count)
