#!/usr/bin/env bash
# Issue 15: full CE of the ~100M bf16 model against the plain torch DDP loop stepped in the same rounds
# (blade bench --anchor), with the launcher's default allocator (tcmalloc on CPU, launch/malloc.sh) and
# with glibc (BLADE_MALLOC=system), launches alternating so that both see the same machine drift.
#   docs/benchmarks/cpu-2core_2026-12-03b/malloc.sh runs/malloc [stages|blade]
#   stages: ZeRO-1/2/3, full CE, both allocators, twice (~12 min)
#   blade:  full and blade at ZeRO-3 with 2 memory steps, both allocators (~11 min)
set -euo pipefail
OUT=${1:?output dir}; SET=${2:-stages}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
MODEL=(-c configs/100m.yaml model.vocab_size=2048 model.max_seq_len=128 train.micro_batch_size=2 optim.fused=true)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
if [ "$SET" = blade ]; then
  BENCH=(--strategies full,blade --anchor --warmup 2 --steps 8 --memory-steps 2 --no-checkpoint)
  RUNS=("z3 deepspeed.zero_stage=3")
  ROUNDS=(a)
else
  BENCH=(--strategies full --anchor --warmup 2 --steps 8 --memory-steps 0 --no-checkpoint)
  RUNS=("z1 deepspeed.zero_stage=1" "z2 deepspeed.zero_stage=2" "z3 deepspeed.zero_stage=3")
  ROUNDS=(a b)
fi
for round in "${ROUNDS[@]}"; do
  for run in "${RUNS[@]}"; do
    for malloc in system auto; do
      set -- $run; name=${SET}_$1_${malloc}_$round; shift
      echo "== $name ($(date +%T), load $(cut -d' ' -f1 /proc/loadavg))"
      (cd "$ROOT" && BLADE_MALLOC=$malloc launch/local.sh 2 --cmd bench "${MODEL[@]}" "$@" "${BENCH[@]}" \
        --out "$OUT/$name" > "$OUT/$name.log" 2>&1)
      grep "^- machine\|plain torch DDP\|^| full\|^| blade\|^Peer" "$OUT/$name/report.md" | cut -c1-200
    done
  done
done
