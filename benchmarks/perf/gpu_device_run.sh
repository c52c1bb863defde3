#!/usr/bin/env bash
# One call on a lent GPU machine (the tool library's device `run`, from the repository root, carry [".whl"]):
#
#   bash benchmarks/perf/gpu_device_run.sh "$OUT" 4     # gpu_run4.sh into $OUT/run4: <= 270 s (timeout_s 330)
#   bash benchmarks/perf/gpu_device_run.sh "$OUT" 5     # gpu_run5.sh into $OUT/run5: <= 330 s (timeout_s 390)
#
# That machine has torch, peft, accelerate and transformers but not diffusers: the wheels in .whl/ (diffusers and
# the one dependency it lacks there; ignored by git, carried) go into a private folder first, unless diffusers
# already imports. Run 4 first: run 5 is what is left (SDXL training and sampling, compiled sampling) when the
# device time allows.
set -u
OUT="${1:?usage: bash benchmarks/perf/gpu_device_run.sh OUTPUT_FOLDER 4|5}"
RUN="${2:?usage: bash benchmarks/perf/gpu_device_run.sh OUTPUT_FOLDER 4|5}"
PYTHON="${PYTHON:-python}"
case "$RUN" in
    4 | 5) ;;
    *) echo "gpu_device_run: the run is 4 or 5, got '$RUN'" >&2; exit 2 ;;
esac
if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    SITE="${TMPDIR:-/tmp}/resattn_site"
    "$PYTHON" -m pip install --quiet --no-deps --target "$SITE" .whl/*.whl || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import diffusers, torch; print('diffusers', diffusers.__version__, '| torch', torch.__version__, \
'| cuda', torch.cuda.is_available())"
exec bash "benchmarks/perf/gpu_run$RUN.sh" "$OUT/run$RUN"
