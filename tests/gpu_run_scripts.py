"""Runs a one-shot GPU run script (``benchmarks/perf/gpu_run<N>.sh``, or ``gpu_device_run.sh OUT N`` around it) on
CPU for its smoke test (not a test file)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_gpu_script(
    script: str, args: list[str], run: int, total_s: int, timeout_s: int, **env: str
) -> subprocess.CompletedProcess:
    """``bash benchmarks/perf/<script> <args>`` with this interpreter, run ``run``'s hard total ``total_s`` (its
    ``GPU_RUN<N>_TOTAL_S``) and ``env``; the completed process gains ``took_s``, the wall seconds it took."""
    environment = dict(os.environ, PYTHON=sys.executable, **{f"GPU_RUN{run}_TOTAL_S": str(total_s)}, **env)
    start = time.monotonic()
    done = subprocess.run(
        ["bash", f"benchmarks/perf/{script}", *args],
        cwd=ROOT,
        env=environment,
        timeout=timeout_s,
        capture_output=True,
        text=True,
    )
    done.took_s = time.monotonic() - start
    return done
