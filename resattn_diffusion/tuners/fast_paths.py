"""Which computation a tuner runs: its reference path or a GPU fast path, chosen per call; and how to force one.

Every fast path computes the same function as the reference path (outputs and gradients agree up to floating-point
rounding; ``tests/test_fast_paths.py`` checks each one on CPU by forcing it). They differ in cost:

* **merged linear** (Res-LoRA, GLoRA, SURM circulant/Toeplitz/Kronecker/LDR beside a linear): instead of the frozen
  ``W0 x + b0`` plus a branch ``T(x) = dW x + db`` (two passes over the activations, and for SURM's FFT paths
  float32 complex spectra of every token kept for backward), the layer runs one GEMM,
  ``F.linear(x, W0 + s dW, b0 + s db)``, with ``dW`` formed once per forward from the tuner's parameters (d_out x
  d_in is small next to the activations of a UNet layer) and carrying the gradient back to them (SURM circulant,
  Toeplitz and LDR form ``dW`` from strided views of their parameters, nothing n x n kept for backward: see
  :meth:`~resattn_diffusion.tuners.structured.StructuredMatrix.dense_matrix`). Chosen on CUDA
  when every active tuner of the layer is parallel and mergeable (see
  :func:`resattn_diffusion.integration.processors.select_linear_path`).
* **dense structured matrix** (SURM-Adapter's projections): the structured matrix materialised once per forward
  and applied as one matmul in the activations' dtype, instead of float32 FFTs over every token (on CUDA, or under
  ``forced_paths("fast")``; otherwise on CPU the cost model of
  :meth:`~resattn_diffusion.tuners.structured.StructuredMatrix.uses_dense_path` decides, and a dense matmul it picks
  runs in float32 like the FFTs).
* **padded heads** (Res-Attn and every branch that uses :func:`~resattn_diffusion.tuners.base.multi_head_attention`):
  a head dimension that is not a multiple of 8 (Res-Attn's default rank 8 over 2 heads: 4) falls off the fused
  flash / memory-efficient attention kernels onto the unfused one, which materialises the N x N scores; the fast
  path zero-pads q, k and v per head to the next multiple of 8 -- zero channels add nothing to ``q . k`` and give
  output channels that are dropped -- and passes the original ``1/sqrt(head_dim)`` scale. On CUDA only.

* **extra heads** (Res-Attn's sampling forward, and with ``ResTunerAttnProcessor.extra_heads_training`` its training
  step): a lone parallel branch that is an attention over the frozen attention's keys runs as extra heads of it --
  its rows and columns concatenated with the frozen projections' weights, one GEMM per input, one SDPA, one output
  GEMM -- instead of ~20 more dispatched ops per attention (on a GPU the forward is bound by the host launching
  kernels). See :meth:`resattn_diffusion.integration.processors.ResTunerAttnProcessor._extra_heads_call`; per
  processor ``extra_heads = "off"`` forces the reference path.

On CPU every default is the reference path (the CPU benchmarks and the digits quality benchmark are unchanged).

Forcing, for tests and benchmarks: ``with forced_paths("reference"): ...`` (or ``"fast"``) overrides the automatic
choice of every tuner in the block, on any device; per module, ``LinearBank.path`` (``"auto"``, ``"branch"``,
``"merged"``), ``StructuredMatrix.path`` (``"auto"``, ``"structured"``, ``"dense"``) and ``ResAttn.head_padding``
(``"auto"``, ``"off"``, ``"on"``) force one layer, and win over ``forced_paths``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .base import ConfigError

#: Values of :func:`forced_paths`: every tuner on its reference path, or on its fast path, whatever the device.
FORCEABLE = ("reference", "fast")
#: Tuners with a fast path (the GPU benchmark also times each with ``forced_paths("reference")``).
FAST_PATH_TUNERS = ("res_attn", "res_lora", "glora", "surm_circulant", "surm_ldr", "surm_adapter")

_forced: list[str] = []


@contextlib.contextmanager
def forced_paths(path: str) -> Iterator[None]:
    """Within the block, every tuner takes its ``"reference"`` or its ``"fast"`` path, on any device (nests; the
    innermost wins). Per-module settings (``LinearBank.path`` & co.) still win over it."""
    if path not in FORCEABLE:
        raise ConfigError(f"forced_paths({path!r}): choose one of {list(FORCEABLE)}")
    _forced.append(path)
    try:
        yield
    finally:
        _forced.pop()


def forced_path() -> str | None:
    """The path :func:`forced_paths` currently forces, or None (automatic choice)."""
    return _forced[-1] if _forced else None


def fast_path_wanted(device_type: str) -> bool:
    """The automatic choice shared by every fast path: forced, else on CUDA (where they were measured to win) and
    never on CPU (where the reference paths were tuned)."""
    forced = forced_path()
    if forced is not None:
        return forced == "fast"
    return device_type == "cuda"
