#!/usr/bin/env bash
# The new commit's speed options, interleaved in one session: default, optim.fused=true (ZeRO-2 and 3),
# optim.fused=true + train.compile=true (ZeRO-2), and the DDP anchor with torch's loop AdamW and fused.
#   docs/benchmarks/cpu-2core_2026-12-02b/variants.sh runs/bench15v [ROUNDS]
set -euo pipefail
OUT=${1:?output dir}; ROUNDS=${2:-2}
NEW=$(cd "$(dirname "$0")/../../.." && pwd)
PY=$NEW/.venv/bin/python
MODEL=(-c configs/100m.yaml model.vocab_size=2048 model.max_seq_len=128 train.micro_batch_size=2
       selection.tau=10 selection.k_ref_steps=3 selection.rho1_ref_steps=3)
BENCH=(--strategies full,blade --warmup 2 --steps 5 --memory-steps 0 --no-checkpoint)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
bench() {  # NAME ROUND overrides... [-- extra bench args]
  local name=$1 r=$2; shift 2
  echo "== round $r: $name ($(date +%T))"
  (cd "$NEW" && launch/local.sh 2 --cmd bench "${MODEL[@]}" "$@" "${BENCH[@]}" --out "$OUT/${name}_r$r" \
     > "$OUT/${name}_r$r.log" 2>&1)
}
ddp() {  # NAME ROUND overrides...
  local name=$1 r=$2; shift 2
  echo "== round $r: $name ($(date +%T))"
  (cd "$NEW" && $PY tools/bench_ddp.py "${MODEL[@]:0:5}" "$@" --warmup 2 --steps 5 --out "$OUT/${name}_r$r.json" \
     > "$OUT/${name}_r$r.log" 2>&1)
}
for r in $(seq 1 "$ROUNDS"); do
  extra=(); [ "$r" = 1 ] && extra=(--profile)
  runs=("bench new_z2 $r deepspeed.zero_stage=2"
        "bench new_z2_fused $r deepspeed.zero_stage=2 optim.fused=true ${extra[*]:-}"
        "bench new_z3_fused $r deepspeed.zero_stage=3 optim.fused=true ${extra[*]:-}"
        "bench new_z2_fused_compile $r deepspeed.zero_stage=2 optim.fused=true train.compile=true"
        "ddp ddp $r" "ddp ddp_fused $r optim.fused=true")
  [ $((r % 2)) = 0 ] && runs=("${runs[@]:3}" "${runs[@]:0:3}")
  for cmd in "${runs[@]}"; do $cmd; done
done
echo "== done ($(date +%T))"
