# Shared by the one-shot GPU run scripts (gpu_run4.sh, gpu_run5.sh): sourced, never run, right at their start. The
# caller sets OUT (the output folder), RUN_NAME (the log prefix), TOTAL (the hard limit in seconds) and PYTHON; this
# makes OUT, sets the environment, LOG (OUT/run.log) and START. Each part runs under `timeout` at its guard + 8 s and
# never past TOTAL.
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
    if [ "$guard" -lt 15 ]; then echo "[$RUN_NAME] $name: skipped, time is up" | tee -a "$LOG"; return; fi
    local t0=$SECONDS
    echo "[$RUN_NAME] $name: guard ${guard}s (elapsed $((SECONDS - START))s)" | tee -a "$LOG"
    timeout -k 2 $((guard + 8)) "$PYTHON" -m "$module" "$@" --budget "$guard" --started-at "$(date +%s.%N)" \
        2>&1 | tee -a "$LOG"
    echo "[$RUN_NAME] $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

# write_summary: gpu_suite's summary.md from the parts' JSON, in what time is left.
write_summary() {
    local left=$((TOTAL - (SECONDS - START)))
    if [ "$left" -ge 8 ]; then
        timeout -k 1 $((left - 1)) "$PYTHON" -m benchmarks.perf.gpu_suite summary --out "$OUT" > /dev/null 2>>"$LOG"
    fi
}
