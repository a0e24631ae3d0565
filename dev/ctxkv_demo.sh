#!/usr/bin/env bash
# make ctxkv-demo: Context-KV's two phases on Tiny Shakespeare next to an MHA run with the
# same budget (model shape, tokens, schedule, seed). About 6 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/ctxkv-demo}
STEPS=${STEPS:-250}
COMMON="--model pythia-14m -b 4 -t 256 --steps $STEPS --lr 2e-3 --warmup 25 --val-every 50 --val-batches 16 --sample-every 0 --seed 1337"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "=== phase 1: the ContextBlock alone, OACD loss, parallel Jacobi iteration ==="
./train_ctxkv --model pythia-14m --layer0 ctxkv -b 8 -t 256 --phase 1 --p1-rounds 6 --seed 1337 --out "$OUT/phase1" | grep -E "^phase 1 (round [0-9]+/|done)"
echo "=== phase 2: block frozen, the rest trains ($STEPS steps) ==="
./train_ctxkv $COMMON --layer0 ctxkv --context-block "$OUT/phase1/context_block.bin" --out "$OUT/ctxkv" | grep -E "val loss|^step [0-9]+/[0-9]+ \| loss" | awk 'NR % 25 == 1 || /val/'
echo "=== baseline: mha, same budget ==="
./train_ctxkv $COMMON --out "$OUT/mha" | grep -E "val loss|^step [0-9]+/[0-9]+ \| loss" | awk 'NR % 25 == 1 || /val/'

kv() { ./train_ctxkv --model pythia-14m "$@" --kv-report | sed 's/.*"kv_bytes_per_token_bf16": \([0-9]*\).*/\1/'; }
field() { sed "s/.*\"$2\": \([-0-9.e]*\).*/\1/" "$1"; }
echo
echo "=== Context-KV demo (pythia-14m shape, Tiny Shakespeare, $STEPS steps of 4x256 tokens) ==="
printf "phase 1: converged fraction %s after %s rounds, OACD loss %s\n" \
  "$(field "$OUT/phase1/metrics.json" converged)" "$(field "$OUT/phase1/metrics.json" rounds)" "$(field "$OUT/phase1/metrics.json" oacd_loss)"
printf "%-22s %10s %12s %22s\n" "model" "val loss" "tokens" "KV bytes/token (bf16)"
printf "%-22s %10s %12s %22s\n" "mha" "$(field "$OUT/mha/metrics.json" val_loss)" "$(field "$OUT/mha/metrics.json" tokens_seen)" "$(kv)"
printf "%-22s %10s %12s %22s\n" "ctxkv layer 0 + mha" "$(field "$OUT/ctxkv/metrics.json" val_loss)" "$(field "$OUT/ctxkv/metrics.json" tokens_seen)" "$(kv --layer0 ctxkv)"
