"""Shared pytest setup for resattn-diffusion.

- Offline: the test machines cannot reach a model hub, so hub access is switched off before any test imports
  diffusers/transformers (a test that tries to download fails fast instead of hanging on the network).
- CPU threads: 1 torch thread per test process by default (override with ``RESATTN_TEST_THREADS=2``). The
  tiny models gain nothing from intra-op parallelism, and on the shared 2-core machines 2 threads competing
  with other processes made a tiny pipeline call 10-30x slower (busy-waiting OpenMP threads), while 1 thread
  stayed at ~30 ms. One thread per process also makes ``pytest -n 2`` (xdist) use exactly the 2 cores.
  Code that sets 2 threads itself (the digits class images, for pixels that do not depend on the machine) would
  still busy-wait: OpenMP's threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, set before torch loads its
  OpenMP runtime), which made a 2-thread convolution beside a busy core ~6x faster (32 -> 5.7 ms; 1 thread: 5.4).
- Determinism: every test starts from ``torch.manual_seed(0)`` (and seeded ``random`` / ``numpy``), so results
  do not depend on test order or on how xdist distributes tests.
- ``tiny_dirs``: the tiny SD 1 / SD 2 / SDXL pipelines of :mod:`resattn_diffusion.testing` saved as diffusers
  folders once per session (per xdist worker, each in its own temporary directory, so ``-n 2`` is safe).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

# before torch (and its OpenMP runtime, which reads it once) loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Make the package importable when pytest runs from a checkout without an installed (editable) package.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _torch_threads() -> int:
    """Torch intra-op threads for this test process: ``RESATTN_TEST_THREADS`` or 1."""
    value = os.environ.get("RESATTN_TEST_THREADS", "1")
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"RESATTN_TEST_THREADS must be a positive integer, got {value!r}.")
    return int(value)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(_torch_threads())


@pytest.fixture(autouse=True)
def seed_everything() -> int:
    """Seed torch, numpy and ``random`` with 0 before every test; returns the seed."""
    seed = 0
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"sd1": folder, "sd2": folder, "sdxl": folder}``: tiny pipelines (seed 0) saved as diffusers folders.

    Load one with ``DiffusionPipeline.from_pretrained(tiny_dirs["sd1"])``; it equals
    ``resattn_diffusion.testing.tiny_pipeline("sd1")``. Do not write into these folders (they are shared by
    all tests of the session); save modified pipelines under ``tmp_path``.
    """
    from resattn_diffusion.testing import KINDS, save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in KINDS}
