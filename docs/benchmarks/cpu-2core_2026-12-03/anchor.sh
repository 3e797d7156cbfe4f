#!/usr/bin/env bash
# Issue 15: full CE of the ~100M bf16 model against the plain torch DDP loop stepped in the same rounds
# (blade bench --anchor), at ZeRO-1/2/3, with DeepSpeed's contiguous_gradients off at ZeRO-2 as a variant.
#   docs/benchmarks/cpu-2core_2026-12-03/anchor.sh runs/anchor [stages|variants|repeat]
set -euo pipefail
OUT=${1:?output dir}; SET=${2:-stages}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
MODEL=(-c configs/100m.yaml model.vocab_size=2048 model.max_seq_len=128 train.micro_batch_size=2 optim.fused=true)
BENCH=(--strategies full --anchor --warmup 2 --steps 8 --memory-steps 0 --no-checkpoint)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
ZO=deepspeed.extra.zero_optimization
RUNS=("z1 deepspeed.zero_stage=1" "z2 deepspeed.zero_stage=2"
      "z2_nocontig deepspeed.zero_stage=2 $ZO.contiguous_gradients=false" "z3 deepspeed.zero_stage=3")
[ "$SET" = variants ] && RUNS=(
      "z2_nocontig_allreduce deepspeed.zero_stage=2 $ZO.contiguous_gradients=false $ZO.reduce_scatter=false"
      "z2_nocontig_fp32comm deepspeed.zero_stage=2 $ZO.contiguous_gradients=false deepspeed.extra.communication_data_type=fp32"
      "z1_nocontig deepspeed.zero_stage=1 $ZO.contiguous_gradients=false")
[ "$SET" = repeat ] && RUNS=(
      "z1_nocontig_b deepspeed.zero_stage=1 $ZO.contiguous_gradients=false"
      "z3_nocontig deepspeed.zero_stage=3 $ZO.contiguous_gradients=false")
for run in "${RUNS[@]}"; do
  set -- $run; name=$1; shift
  echo "== $name ($(date +%T), load $(cut -d' ' -f1 /proc/loadavg))"
  (cd "$ROOT" && launch/local.sh 2 --cmd bench "${MODEL[@]}" "$@" "${BENCH[@]}" --out "$OUT/$name" > "$OUT/$name.log" 2>&1)
  grep "plain torch DDP" "$OUT/$name/report.md" | tail -1
done
