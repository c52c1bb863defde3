#!/usr/bin/env bash
# The lead's THIRD GPU run (issue 14), from the repository root (prepend the wheel install / PYTHONPATH as before):
#
#   bash benchmarks/perf/gpu_run3.sh gpu_results3
#
# Hard wall-clock limit: GPU_RUN3_TOTAL_S (default 240 s) for everything, each part killed by `timeout` at its
# guard + 8 s and never past the total (a part gets at most what is left; unused time passes on):
#   (a) profile     benchmarks/perf/gpu_profile.py: torch.profiler over 1 SD 1.5 training step (512 px, batch 4,
#                   fp16) of floor, res_attn, peft LoRA, surm_ldr, surm_circulant, glora and 3 eager sampling
#                   forwards (batch 2) of the base and res_attn unfused: top 15 kernels, frozen / branch / fold /
#                   optimizer kernel time, wall vs kernel time, bytes saved for backward per tuner module  guard 110 s
#   (b) train_sd15  floor, res_attn, surm_ldr, surm_kronecker, surm_circulant, surm_toeplitz, peft LoRA, peft C3A
#                   matched to circulant and to Toeplitz, and surm_ldr "[run-2 dense]" (its delta formed as in run 2:
#                   FFT of the identity, spectra kept), no heads=1 / [reference] / [fast] rows: step time and peak
#                   memory of the SURM deltas formed from strided views (LDR's product recomputed)     guard  75 s
#   (c) sampling    eager, batch 2: base, res_attn unfused, peft LoRA (unfused, fused): whatever is left (~40 s)
# Output in OUT (6 files): profile.json, profile.md, train_sd15.json, sampling.json, summary.md, run.log.
# CPU smoke test (tests/test_gpu_run3.py): GPU_SUITE_ARGS="--tiny --device cpu" PROFILE_ARGS="--tiny --device cpu".
set -u
OUT="${1:?usage: bash benchmarks/perf/gpu_run3.sh OUTPUT_FOLDER}"
PYTHON="${PYTHON:-python}"
EXTRA_ARGS="${GPU_SUITE_ARGS:-}"
PROFILE_ARGS="${PROFILE_ARGS:-}"
TOTAL="${GPU_RUN3_TOTAL_S:-240}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
LOG="$OUT/run.log"
START=$SECONDS

# clip GUARD -> the seconds a part may have: GUARD, clipped so that guard + kill margin stays inside TOTAL.
clip() {
    local want="$1" left=$((TOTAL - (SECONDS - START) - 10))
    if [ "$want" -gt "$left" ]; then want=$left; fi
    echo "$want"
}

# run_guarded NAME GUARD MODULE [ARGS...]: python -m MODULE ARGS --budget GUARD under timeout, logged.
run_guarded() {
    local name="$1" guard
    guard="$(clip "$2")"
    local module="$3"
    shift 3
    if [ "$guard" -lt 15 ]; then echo "[gpu_run3] $name: skipped, time is up" | tee -a "$LOG"; return; fi
    local t0=$SECONDS
    echo "[gpu_run3] $name: guard ${guard}s (elapsed $((SECONDS - START))s)" | tee -a "$LOG"
    timeout -k 2 $((guard + 8)) "$PYTHON" -m "$module" "$@" --budget "$guard" --started-at "$(date +%s.%N)" \
        2>&1 | tee -a "$LOG"
    echo "[gpu_run3] $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

# shellcheck disable=SC2086
run_guarded profile 110 benchmarks.perf.gpu_profile --out "$OUT" $PROFILE_ARGS
# shellcheck disable=SC2086
run_guarded train_sd15 75 benchmarks.perf.gpu_suite train_sd15 --out "$OUT" \
    --tuners res_attn surm_ldr surm_kronecker surm_circulant surm_toeplitz --run2-dense-rows surm_ldr \
    --peer-rows peft_lora "peft_c3a (~surm_circulant)" "peft_c3a (~surm_toeplitz)" --no-extra-rows $EXTRA_ARGS
# shellcheck disable=SC2086
run_guarded sampling 400 benchmarks.perf.gpu_suite sampling --out "$OUT" --tuners res_attn $EXTRA_ARGS
# Every suite part already rewrote summary.md as it went; rebuild it once more only if the total leaves time.
LEFT=$((TOTAL - (SECONDS - START)))
if [ "$LEFT" -ge 8 ]; then
    timeout -k 1 $((LEFT - 1)) "$PYTHON" -m benchmarks.perf.gpu_suite summary --out "$OUT" > /dev/null 2>>"$LOG"
fi
echo "[gpu_run3] done in $((SECONDS - START))s: $OUT/profile.md, $OUT/summary.md" | tee -a "$LOG"
