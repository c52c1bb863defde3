#!/usr/bin/env bash
# The FOURTH GPU run (issue 14: Res-Attn's host overhead), from the repository root (prepend the wheel install /
# PYTHONPATH as before):
#
#   bash benchmarks/perf/gpu_run4.sh gpu_results4
#
# Hard wall-clock limit: GPU_RUN4_TOTAL_S (default 270 s) for everything, each part killed by `timeout` at its
# guard + 8 s and never past the total (a part gets at most what is left; unused time passes on):
#   (a) host_overhead  benchmarks/perf/host_overhead.py --device cuda: SD 1.5's block structure at tiny widths
#                      (compute negligible), fp16, batch 2: aten ops dispatched and wall time of one no-grad forward
#                      and one training step (autocast, fp32 tuner parameters, AdamW) of the base, res_attn, peft
#                      LoRA matched, res_lora, res_attn [reference] / [extra heads], glora, surm_ldr and
#                      (training) "surm_ldr [run-3 dense]"; ratios paired against the base               guard  60 s
#   (b) sampling       eager SD 1.5 forward, fp16, batch 2: base, res_attn unfused (now extra heads of the frozen
#                      attention), res_lora unfused and fused (run 1: fused 1.035x, target 1.02x), peft LoRA
#                      (unfused, fused): the sampling targets (<= 1.10x the base; fused <= 1.02x)      guard  80 s
#   (c) ldr_delta      SURM LDR's fast dense delta alone, forward + backward, at SD 1.5's six projection shapes:
#                      its FFT convolution against run 3's float32 matmul form, ops and paired time ratios  guard  30 s
#   (d) train_sd15     SD 1.5 512 px, batch 4, fp16: floor, res_attn, "res_attn [extra heads]" (the branch as
#                      extra heads in training too: ResTunerAttnProcessor.extra_heads_training, off by default until
#                      this row measures it), peft LoRA: the step targets (<= 0.75x peft LoRA, <= 1.30x the floor);
#                      glora (fewer ops per call since run 2) and "glora (peft's config)" beside peft GLoRA (<= 1.0x
#                      peft LoRA, <= 0.85x peft GLoRA), surm_ldr (<= 1.0x peft LoRA; its delta by FFT
#                      convolution since run 3) and "surm_ldr [run-3 dense]" (run 3's float32 matmul form, same
#                      rounds)                                                                             what is left
# Output in OUT (8 files): host_overhead.json/.md, sampling.json, ldr_delta.json/.md, train_sd15.json, summary.md,
# run.log. CPU smoke test (tests/test_gpu_run4.py): HOST_ARGS="--tiny --device cpu" LDR_ARGS="--tiny --device cpu"
# GPU_SUITE_ARGS="--tiny --device cpu".
set -u
OUT="${1:?usage: bash benchmarks/perf/gpu_run4.sh OUTPUT_FOLDER}"
PYTHON="${PYTHON:-python}"
HOST_ARGS="${HOST_ARGS:---device cuda}"
LDR_ARGS="${LDR_ARGS:---device cuda}"
EXTRA_ARGS="${GPU_SUITE_ARGS:-}"
TOTAL="${GPU_RUN4_TOTAL_S:-270}"
RUN_NAME=gpu_run4
# shellcheck source=benchmarks/perf/gpu_run_common.sh
source "$(dirname "$0")/gpu_run_common.sh"

# shellcheck disable=SC2086
run_guarded host_overhead 60 benchmarks.perf.host_overhead --out "$OUT/host_overhead.json" $HOST_ARGS
# shellcheck disable=SC2086
run_guarded sampling 80 benchmarks.perf.gpu_suite sampling --out "$OUT" --tuners res_attn res_lora $EXTRA_ARGS
# shellcheck disable=SC2086
run_guarded ldr_delta 30 benchmarks.perf.ldr_delta --out "$OUT/ldr_delta.json" $LDR_ARGS
# shellcheck disable=SC2086
run_guarded train_sd15 400 benchmarks.perf.gpu_suite train_sd15 --out "$OUT" --tuners res_attn glora surm_ldr \
    --peer-rows peft_lora peft_glora --no-extra-rows --extra-heads-row --run3-dense-rows surm_ldr $EXTRA_ARGS
write_summary
echo "[gpu_run4] done in $((SECONDS - START))s: $OUT/host_overhead.md, $OUT/summary.md" | tee -a "$LOG"
