#!/usr/bin/env bash
# The lead's SECOND GPU run (issue 14), from the repository root (prepend the wheel install / PYTHONPATH as before):
#
#   bash benchmarks/perf/gpu_run2.sh gpu_results2
#
# Hard wall-clock limit: GPU_RUN2_TOTAL_S (default 325 s) for everything, each part killed by `timeout` at its
# guard + 8 s and never past the total. Only what changed since run 1, and the peers to compare it with:
#   (a) train_sd15   glora (+ [reference], + peft's forms), surm_circulant (+ [reference]), surm_toeplitz,
#                    surm_ldr, floor, peft LoRA, peft GLoRA, peft C3A matched                      guard  95 s
#   (c) graph_breaks the rows run 1 skipped (res_bypass, glora, surm_*) and surm_adapter (35 breaks) guard  45 s
#   (d) transformer  benchmarks/perf/transformer_step.py --device cuda (the row that crashed)    guard  35 s
#                    WITHOUT CUDA_LAUNCH_BLOCKING (it serialises every launch and would distort the step times);
#                    if it fails and >= 165 s are left, once more (20 s) with CUDA_LAUNCH_BLOCKING=1 for the true
#                    faulting kernel in run.log (timings of that rerun are not to be used)
#   (b) sampling_compiled  base and res_attn (unfused) only, eager vs torch.compile: last, with whatever is left
#                    (~150 s; the base's cold compile took 64 s in run 1)
# Output in OUT (6 files): train_sd15.json, graph_breaks.json, transformer_step.json, sampling_compiled.json,
# summary.md, run.log. Inductor's cache goes to a fresh temporary folder (cold compiles, nothing stale), removed
# afterwards. CPU smoke test (tests/test_gpu_run2.py): GPU_SUITE_ARGS="--tiny --device cpu --compile-backend eager"
# TRANSFORMER_ARGS="--device cpu --tiny".
set -u
OUT="${1:?usage: bash benchmarks/perf/gpu_run2.sh OUTPUT_FOLDER}"
PYTHON="${PYTHON:-python}"
EXTRA_ARGS="${GPU_SUITE_ARGS:-}"
TRANSFORMER_ARGS="${TRANSFORMER_ARGS:---device cuda}"
TOTAL="${GPU_RUN2_TOTAL_S:-325}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
CACHE_DIR="$(mktemp -d)"
export TORCHINDUCTOR_CACHE_DIR="$CACHE_DIR"
trap 'rm -rf "$CACHE_DIR"' EXIT
LOG="$OUT/run.log"
START=$SECONDS

# guard GUARD -> the seconds a part may have: GUARD, clipped so that guard + kill margin stays inside TOTAL.
clip() {
    local want="$1" left=$((TOTAL - (SECONDS - START) - 10))
    if [ "$want" -gt "$left" ]; then want=$left; fi
    echo "$want"
}

suite_part() {  # suite_part PART GUARD [ARGS...]
    local part="$1" guard
    guard="$(clip "$2")"
    shift 2
    if [ "$guard" -lt 15 ]; then echo "[gpu_run2] $part: skipped, time is up" | tee -a "$LOG"; return; fi
    local t0=$SECONDS
    echo "[gpu_run2] $part: guard ${guard}s (elapsed $((SECONDS - START))s)" | tee -a "$LOG"
    # shellcheck disable=SC2086
    timeout -k 2 $((guard + 8)) "$PYTHON" -m benchmarks.perf.gpu_suite "$part" --out "$OUT" --budget "$guard" \
        --started-at "$(date +%s.%N)" "$@" $EXTRA_ARGS 2>&1 | tee -a "$LOG"
    echo "[gpu_run2] $part: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

transformer() {  # transformer GUARD [ENV...]
    local guard
    guard="$(clip "$1")"
    shift
    if [ "$guard" -lt 15 ]; then echo "[gpu_run2] transformer: skipped, time is up" | tee -a "$LOG"; return 1; fi
    echo "[gpu_run2] transformer $*: guard ${guard}s (elapsed $((SECONDS - START))s)" | tee -a "$LOG"
    # shellcheck disable=SC2086
    env "$@" timeout -k 2 $((guard + 8)) "$PYTHON" -m benchmarks.perf.transformer_step $TRANSFORMER_ARGS \
        --out "$OUT" --time_limit "$guard" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    echo "[gpu_run2] transformer: exit $status" | tee -a "$LOG"
    return "$status"
}

suite_part train_sd15 95 --tuners glora surm_circulant surm_toeplitz surm_ldr
suite_part graph_breaks 45 --tuners surm_adapter glora surm_circulant surm_toeplitz surm_kronecker surm_ldr res_bypass
if ! transformer 35 PYTHONUNBUFFERED=1; then
    if [ $((TOTAL - (SECONDS - START))) -ge 165 ]; then
        cp "$OUT/transformer_step.json" "$OUT/transformer_step.timed.json" 2>/dev/null || true
        transformer 20 CUDA_LAUNCH_BLOCKING=1 || true
        # the timed run's JSON is the one to keep; the blocking rerun only adds the faulting kernel to run.log
        if [ -f "$OUT/transformer_step.timed.json" ]; then mv "$OUT/transformer_step.timed.json" "$OUT/transformer_step.json"; fi
    fi
fi
suite_part sampling_compiled 400 --tuners res_attn --compiled-rows base "res_attn (unfused)"
# Every part already rewrote summary.md as it went; rebuild it once more only if the total leaves time for it.
LEFT=$((TOTAL - (SECONDS - START)))
if [ "$LEFT" -ge 8 ]; then
    timeout -k 1 $((LEFT - 1)) "$PYTHON" -m benchmarks.perf.gpu_suite summary --out "$OUT" > /dev/null 2>>"$LOG"
fi
echo "[gpu_run2] done in $((SECONDS - START))s: $OUT/summary.md" | tee -a "$LOG"
