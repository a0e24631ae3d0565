#!/usr/bin/env bash
# dev/gpu_first_run.sh: the one command to run when a GPU is lent (at most TOTAL_S = 470 s).
# It needs the repository, nvcc, gcc and make, and stb_ds.h (STB_DIR, or /usr/include/stb, or a
# copy carried in build/stb: `make gpu-carry` puts one there). Nothing is downloaded.
#
#   bash dev/gpu_first_run.sh              # every stage; the report: build/gpu_first_run/report.md
#   bash dev/gpu_first_run.sh --dry-run    # print each stage, its time limit and its commands
#   STAGES="build harness" bash dev/gpu_first_run.sh    # a subset (info build harness sanitize bench decode)
#
# Stages (each stopped at its time limit, so a hang cannot eat the lease; a stage that fails or
# times out is reported and the next one runs):
#   info      GPU, driver, nvcc, compute capability
#   build     ./train_ctxkv (CPU), ./train_ctxkv_cu and ./test_ctxkv_cu in bf16 and fp32 for this GPU
#   harness   test_ctxkv_cu in both precisions: HF/PyTorch references on the GPU, CUDA against CPU
#             at the tiny shapes and at real ones (pythia-14m every variant, pythia-160m, T 1024)
#   sanitize  compute-sanitizer memcheck, initcheck, racecheck on the fp32 harness's first checks
#             and on the dev/cuda kernel files (a tool the machine refuses is reported, not fatal)
#   bench     a training step at pythia-160m, B 8, T 1024, per variant: tokens/s, bf16 MFU (llm.c's
#             estimate: 6·N + 6·L·C·T flops per token against 989 TFLOPS dense bf16), peak memory
#   decode    KV-cached generation at batch 1 and 8 per variant
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=build/gpu_first_run
STAGES=${STAGES:-"info build harness sanitize bench decode"}
VARIANTS=${VARIANTS:-"mha|--attn gqa --n-kv-head 3|--attn mqa|--attn mla --kv-rank 256 --rope-dim 64|--layer0 ctxkv"}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
TOTAL_S=${TOTAL_S:-470}          # the whole run stops within this (the lease is 15 minutes in all)
DEADLINE=$(($(date +%s) + TOTAL_S))
if [ -z "${STB_DIR:-}" ]; then
    for d in /usr/include/stb build/stb shared/stb; do [ -f "$d/stb_ds.h" ] && STB_DIR=$d && break; done
fi
STB_DIR=${STB_DIR:-/usr/include/stb}
mkdir -p "$OUT"
REPORT=$OUT/report.md
LOG=$OUT/run.log
if [ $DRY = 0 ]; then
    : > "$LOG"
    { echo "# GPU first run"; echo; echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"; echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; } > "$REPORT"
fi

note() { [ $DRY = 1 ] && return 0; echo "$*" >> "$REPORT"; echo "$*"; }

# run LIMIT_S CMD...: one command under a time limit (and within the whole run's TOTAL_S), its
# output to the log; returns its status (124: timed out, 125: no time left)
run() {
    local limit=$1; shift
    if [ $DRY = 1 ]; then echo "    [limit ${limit}s] $*"; return 0; fi
    local left=$((DEADLINE - $(date +%s)))
    if [ $left -lt 5 ]; then note "SKIP (the run's ${TOTAL_S}s are spent): $*"; return 125; fi
    [ $limit -gt $left ] && limit=$left
    echo "\$ $*" >> "$LOG"
    timeout --kill-after=10 "$limit" bash -c "$*" >> "$LOG" 2>&1
    local rc=$?
    [ $rc = 124 ] || [ $rc = 137 ] && note "TIMEOUT after ${limit}s: $*"
    return $rc
}

stage() { echo; echo "== stage $1 (limit ${2}s in all)"; [ $DRY = 1 ] || echo -e "\n## $1\n" >> "$REPORT"; }
want() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }

CC_CAP=90
if command -v nvidia-smi > /dev/null && [ $DRY = 0 ]; then
    CC_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.' | tr -d ' ')
    [ -n "$CC_CAP" ] || CC_CAP=90
fi
MAKE_ARGS="STB_DIR=$STB_DIR GPU_COMPUTE_CAPABILITY=$CC_CAP"

if want info; then
    stage info 30
    run 20 "nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv" || note "FAIL nvidia-smi"
    run 10 "nvcc --version | tail -n 2" || note "FAIL nvcc --version"
    [ $DRY = 1 ] || { note "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)";
                      note "- nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"; note "- stb_ds.h from: $STB_DIR"; }
fi

if want build; then
    stage build 230
    run 30 "make -s train_ctxkv STB_DIR=$STB_DIR" && note "PASS build train_ctxkv (CPU)" || note "FAIL build train_ctxkv (CPU)"
    for p in bf16 fp32; do
        prec=$([ $p = fp32 ] && echo "PRECISION=FP32" || echo "")
        if run 100 "rm -f train_ctxkv_cu test_ctxkv_cu && make -s -j8 train_ctxkv_cu test_ctxkv_cu $MAKE_ARGS $prec && cp train_ctxkv_cu $OUT/train_ctxkv_cu_$p && cp test_ctxkv_cu $OUT/test_ctxkv_cu_$p"; then
            note "PASS build $p for sm_$CC_CAP"
        else
            note "FAIL build $p for sm_$CC_CAP (see $LOG)"
        fi
    done
fi

if want harness; then
    stage harness 200
    for p in bf16 fp32; do
        if run 100 "TRAIN_BIN_CU=$OUT/train_ctxkv_cu_$p $OUT/test_ctxkv_cu_$p > $OUT/harness_$p.log 2>&1"; then rc=0; else rc=$?; fi
        if [ $DRY = 0 ]; then
            grep -E "^(PASS|FAIL|SKIP)" "$OUT/harness_$p.log" | sed "s/^/    [$p] /" >> "$REPORT"
            note "harness $p: $(tail -n 1 "$OUT/harness_$p.log") (exit $rc)"
        fi
    done
fi

if want sanitize; then
    stage sanitize 300
    if ! command -v compute-sanitizer > /dev/null && [ $DRY = 0 ]; then
        note "SKIP sanitize: compute-sanitizer not found"
    else
        for tool in memcheck initcheck racecheck; do
            # the reference checks only (argv: one model/state pair): seconds on a GPU, minutes under the tool
            if run 30 "compute-sanitizer --tool $tool --error-exitcode 3 $OUT/test_ctxkv_cu_fp32 dev/ref/tiny_model.bin dev/ref/tiny_state.bin > $OUT/sanitize_$tool.log 2>&1"; then
                note "PASS compute-sanitizer $tool: test_ctxkv_cu (fp32) on the tiny reference"
            else
                rc=$?
                note "$([ $rc = 3 ] && echo FAIL || echo "NOT RUN (exit $rc)") compute-sanitizer $tool: $(grep -m1 -E 'ERROR|Error|error' $OUT/sanitize_$tool.log 2>/dev/null)"
            fi
        done
        if run 60 "make -s -j8 dev-cuda $MAKE_ARGS PRECISION=FP32"; then
            for f in build/cuda-check/dev/*; do
                [ -x "$f" ] || continue
                # DEV_CUDA_QUICK: the emulator's sizes and one timed call (dev/cuda/common.h)
                if run 15 "DEV_CUDA_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 3 $f > $OUT/sanitize_$(basename "$f").log 2>&1"; then
                    note "PASS compute-sanitizer memcheck dev/cuda/$(basename "$f").cu"
                else
                    note "FAIL compute-sanitizer memcheck dev/cuda/$(basename "$f").cu (see $OUT/sanitize_$(basename "$f").log)"
                fi
            done
        else
            note "FAIL build dev/cuda"
        fi
    fi
fi

# peak GPU memory while CMD runs, from nvidia-smi every 0.2 s (MiB)
peak_mem() {
    local f=$OUT/mem.txt
    : > "$f"
    ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$f" 2>/dev/null; sleep 0.2; done ) &
    local pid=$!
    "$@"; local rc=$?
    kill $pid 2> /dev/null; wait $pid 2> /dev/null
    PEAK=$(sort -n "$f" | tail -n 1)
    return $rc
}

if want bench; then
    stage bench 150
    [ $DRY = 1 ] || note "| variant | ms/step | tokens/s | bf16 MFU | peak memory (MiB) |"
    [ $DRY = 1 ] || note "|---|---|---|---|---|"
    IFS='|' read -ra VS <<< "$VARIANTS"
    for v in "${VS[@]}"; do
        flags=$([ "$v" = mha ] && echo "" || echo "$v")
        cmd="$OUT/train_ctxkv_cu_bf16 --model pythia-160m $flags -b 8 -t 1024 --bench 3 > $OUT/bench.json 2>> $LOG"
        if [ $DRY = 1 ]; then run 30 "$cmd"; continue; fi
        if peak_mem run 30 "$cmd"; then
            line=$(tail -n 1 $OUT/bench.json)
            ms=$(echo "$line" | sed -n 's/.*"ms_per_step": \([0-9.]*\).*/\1/p')
            params=$($OUT/train_ctxkv_cu_bf16 --model pythia-160m $flags --kv-report | sed -n 's/.*"params": \([0-9]*\).*/\1/p')
            mfu=$(awk -v n="$params" -v ms="$ms" -v peak="$PEAK_TFLOPS" 'BEGIN { fpt = 6 * n + 6 * 12 * 768 * 1024; printf "%.1f%%", 100 * fpt * 8 * 1024 / (ms / 1e3) / (peak * 1e12) }')
            tps=$(awk -v ms="$ms" 'BEGIN { printf "%.0f", 8 * 1024 / (ms / 1e3) }')
            note "| $v | $ms | $tps | $mfu | $PEAK |"
        else
            note "| $v | FAIL or TIMEOUT | | | |"
        fi
    done
fi

if want decode; then
    stage decode 60
    IFS='|' read -ra VS <<< "$VARIANTS"
    for v in "${VS[@]}"; do
        flags=$([ "$v" = mha ] && echo "" || echo "$v")
        cmd="$OUT/train_ctxkv_cu_bf16 --model pythia-160m $flags --steps 0 --val '' --tokenizer '' --eval-gen --gen-prompt 128 --gen-new 256 > $OUT/decode.txt 2>> $LOG"
        if run 12 "$cmd"; then
            [ $DRY = 1 ] || note "- decode $v: $(grep -m1 'generation:' $OUT/decode.txt)"
        else
            [ $DRY = 1 ] || note "- decode $v: FAIL or TIMEOUT"
        fi
    done
fi

echo
[ $DRY = 1 ] && echo "(dry run: nothing was run)" || echo "report: $REPORT (full log: $LOG)"
