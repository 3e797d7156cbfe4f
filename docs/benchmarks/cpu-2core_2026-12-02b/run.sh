#!/usr/bin/env bash
# Issue 15 figures on a 2-core CPU: old commit vs new, interleaved in one session, plus the DDP anchor.
#   git worktree add --detach ../old 82207e8 && ln -s "$PWD/data" ../old/data
#   docs/benchmarks/cpu-2core_2026-12-02b/run.sh ../old runs/bench15 [ROUNDS]
# Each round runs, in turn: old ZeRO-3, new ZeRO-3, old ZeRO-2, new ZeRO-2 (`blade bench`, full and
# blade), then tools/bench_ddp.py; the order of old and new alternates between rounds.
set -euo pipefail
OLD=$(cd "${1:?old worktree}" && pwd); OUT=${2:?output dir}; ROUNDS=${3:-3}
NEW=$(cd "$(dirname "$0")/../../.." && pwd)
PY=$NEW/.venv/bin/python
MODEL=(-c configs/100m.yaml model.vocab_size=2048 model.max_seq_len=128 train.micro_batch_size=2
       selection.tau=10 selection.k_ref_steps=3 selection.rho1_ref_steps=3)
BENCH=(--strategies full,blade --warmup 2 --steps 5 --memory-steps 0 --no-checkpoint)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
bench() {  # TREE NAME STAGE ROUND [extra bench args]
  local tree=$1 name=$2 stage=$3 r=$4; shift 4
  echo "== round $r: $name ZeRO-$stage ($(date +%T))"
  (cd "$tree" && PYTHON=$PY PYTHONPATH=$tree launch/local.sh 2 --cmd bench "${MODEL[@]}" \
     deepspeed.zero_stage="$stage" "${BENCH[@]}" "$@" --out "$OUT/${name}_z${stage}_r$r" \
     > "$OUT/${name}_z${stage}_r$r.log" 2>&1)
}
for r in $(seq 1 "$ROUNDS"); do
  extra=(); [ "$r" = 1 ] && extra=(--profile)
  for stage in 3 2; do
    if [ $((r % 2)) = 1 ]; then bench "$OLD" old $stage $r; bench "$NEW" new $stage $r "${extra[@]}"
    else bench "$NEW" new $stage $r "${extra[@]}"; bench "$OLD" old $stage $r; fi
  done
  echo "== round $r: DDP anchor ($(date +%T))"
  (cd "$NEW" && $PY tools/bench_ddp.py "${MODEL[@]:0:5}" --warmup 2 --steps 5 --out "$OUT/ddp_r$r.json" \
     > "$OUT/ddp_r$r.log" 2>&1)
done
echo "== done ($(date +%T))"
