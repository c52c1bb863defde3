#!/usr/bin/env bash
# The lead's one command (from the repository root; prepend the wheel install and `export PYTHONPATH=...`):
#
#   bash benchmarks/perf/gpu_run.sh gpu_results
#
# Runs the GPU performance suite of issue 14 in at most ~7 minutes on one GPU and writes, into the folder given
# (created if missing), one JSON per part and summary.md -- both updated as each part goes, so a kill keeps what
# was measured -- plus run.log (this script's output). Parts, in order of importance, each with its own time guard
# (the guard is the part's budget plus what the parts before it left unused; a hard `timeout` 25 s above it):
#   train_sd15         SD 1.5 512 px batch 4 fp16 training steps: floor, every tuner, fast paths vs [reference],
#                      res_attn heads=1, peft LoRA / GLoRA / C3A                                      110 s
#   sampling           SD 1.5 batch 2 fp16 no-grad forward, eager, every tuner unfused/fused, peft LoRA   45 s
#   train_sdxl         SDXL 1024 px batch 1 bf16: floor, res_attn, res_bypass, peft LoRA                  70 s
#   graph_breaks       torch._dynamo.explain of every tuner (small UNet)                                 30 s
#   sampling_compiled  torch.compile: base, res_attn, peft LoRA, res_lora fused                         120 s
# A case that fails (e.g. out of memory) is an error in its row; a part that fails or is killed does not stop
# the next one. Afterwards: `python -m benchmarks.perf.gpu_suite readme-table --out gpu_results` prints the
# README's table. Smoke test on CPU (what tests/test_gpu_suite.py runs): GPU_SUITE_ARGS="--tiny --device cpu".
set -u
OUT="${1:?usage: bash benchmarks/perf/gpu_run.sh OUTPUT_FOLDER}"
PYTHON="${PYTHON:-python}"
EXTRA_ARGS="${GPU_SUITE_ARGS:-}"
TOTAL_BUDGET="${GPU_SUITE_TOTAL_S:-400}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
# Many UNets resident at once (one per row) and steps of different shapes: less fragmentation.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# Inductor compiles with every core; its cache stays inside the output folder (no stale cache from elsewhere).
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}"

START=$SECONDS
CARRY=0
run_part() {
    local part="$1" budget="$2"
    local used=$((SECONDS - START))
    local left=$((TOTAL_BUDGET - used))
    local guard=$((budget + CARRY))
    if [ "$guard" -gt "$left" ]; then guard=$left; fi
    if [ "$guard" -lt 10 ]; then
        echo "[gpu_run] $part: skipped, ${left}s left of ${TOTAL_BUDGET}s" | tee -a "$OUT/run.log"
        return
    fi
    local part_start=$SECONDS
    echo "[gpu_run] $part: time guard ${guard}s (elapsed ${used}s)" | tee -a "$OUT/run.log"
    # shellcheck disable=SC2086
    timeout -k 5 $((guard + 25)) "$PYTHON" -m benchmarks.perf.gpu_suite "$part" --out "$OUT" --budget "$guard" \
        --started-at "$(date +%s.%N)" $EXTRA_ARGS 2>&1 | tee -a "$OUT/run.log"
    local status=${PIPESTATUS[0]}
    local took=$((SECONDS - part_start))
    echo "[gpu_run] $part: exit $status after ${took}s" | tee -a "$OUT/run.log"
    CARRY=$((guard - took))
    if [ "$CARRY" -lt 0 ]; then CARRY=0; fi
}

run_part train_sd15 110
run_part sampling 45
run_part train_sdxl 70
run_part graph_breaks 30
run_part sampling_compiled 120
"$PYTHON" -m benchmarks.perf.gpu_suite summary --out "$OUT" > /dev/null 2>>"$OUT/run.log"
echo "[gpu_run] done in $((SECONDS - START))s: $OUT/summary.md" | tee -a "$OUT/run.log"
