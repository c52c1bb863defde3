#!/usr/bin/env bash
# One entry point for the README's two set-up commands:
#   bash scripts/dev.sh demo   -- install into .venv and run the main job
#   bash scripts/dev.sh test   -- install into .venv (with dev extras), run ruff, then the tests
#   bash scripts/dev.sh mutate [PATH ...] -- mutation testing (scripts/mutate.py; README "Mutation score"). It installs
#     nothing: it runs on $MUTATE_PYTHON, else .venv/bin/python, else python3, which must have the dev extras
#     (mutmut among them). MUTATE_WORKERS (default: all cores), MUTATE_OUT (default: mutation-results/).
# torch is installed first, pinned: on a CPU-only machine a bare "torch" requirement pulls a multi-GB CUDA build.
# Set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>") to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"; shift || true
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# OpenMP threads wait passively: busy-waiting ones were 6-10x slower beside another busy process (pytest -n 2's other
# worker, any job on a shared machine) wherever code runs 2 threads (README "Suite size and speed")
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

if [ "$what" = "mutate" ]; then
  # no install step: the lead's machines run this offline, from wheels installed beforehand
  PY="${MUTATE_PYTHON:-}"
  if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
  if ! "$PY" -c "import mutmut, resattn_diffusion" >/dev/null 2>&1; then
    echo "dev.sh mutate: $PY lacks mutmut or this package's dependencies: pip install 'mutmut==3.8.1' and the" \
      "dev extras, or set MUTATE_PYTHON to a python that has them" >&2
    exit 2
  fi
  exec "$PY" scripts/mutate.py "$@"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
if ! $PY -c "import torch" >/dev/null 2>&1; then
  $PY -m pip install -q $TORCH_SPEC
fi
extras="dev"
[ "$what" = "demo" ] && extras="demo,train,peers"
# pip keeps the torch already installed: its requirement (torch>=2.1) is satisfied, so nothing more is pulled.
$PY -m pip install -q -e ".[$extras]" 2>&1 | grep -v "is ignored" || true
$PY -c "import resattn_diffusion, torch; print('resattn-diffusion', resattn_diffusion.__version__, '| torch', torch.__version__)"

case "$what" in
  test)
    # lint first (ruff is in the dev extras; its settings are in pyproject.toml): a finding fails the run before pytest
    $PY -m ruff check .
    exec $PY -m pytest -n 2 -p no:cacheprovider "$@" tests
    ;;
  demo)
    exec $PY -m benchmarks.digits.demo "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh [test|demo|mutate] [extra args]" >&2; exit 2
    ;;
esac
