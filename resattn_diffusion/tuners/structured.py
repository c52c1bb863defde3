r"""Structured matrices applied without materialising them: circulant, skew-circulant, Toeplitz, Kronecker and
low displacement rank (LDR). The building blocks of SURM (:mod:`resattn_diffusion.tuners.surm`).

Conventions (all vectors are indexed from 0; ``x`` is applied along its last dim, any leading dims are a batch):

* circulant, first column ``v`` (length n): ``circ(v)[i, j] = v[(i - j) mod n]``, so ``circ(v) x`` is the
  cyclic convolution ``v (*) x = irfft(rfft(v) * rfft(x))``.
* skew-circulant, first column ``h``: ``skew(h)[i, j] = h[i - j]`` for ``i >= j`` and ``-h[n + i - j]`` for
  ``i < j`` (a circulant whose wrapped-around upper triangle is negated), so ``skew(h) x`` is the negacyclic
  convolution. With ``w = exp(i pi / n)`` (a 2n-th root of unity, ``w^n = -1``) and ``M = diag(w^0, ..., w^(n-1))``:
  ``skew(h) = M^-1 circ(M h) M``, i.e. ``skew(h) x = conj(w^t) * ifft(fft(w^t h) * fft(w^t x))``.
* Toeplitz d_out x d_in, parameters ``t`` of length ``d_out + d_in - 1``: ``T(t)[i, j] = t[i - j + d_in - 1]``
  (``t[d_in - 1:]`` is the first column, ``t[d_in - 1::-1]`` the first row). ``T(t) x`` is the slice
  ``[d_in - 1, d_in - 1 + d_out)`` of the linear convolution ``t * x``; zero-padding both to a length
  ``L >= d_out + d_in - 1`` (the embedding of ``T(t)`` in an L x L circulant) makes the cyclic convolution agree
  with the linear one on that slice, so ``T(t) x = irfft(rfft(t, L) * rfft(x, L))[d_in - 1 : d_in - 1 + d_out]``.
  ``L`` is rounded up to a fast FFT length (a product of 2, 3 and 5).
* Kronecker ``A (x) B`` with ``A`` a1 x a2, ``B`` b1 x b2: ``(A (x) B)[i1 b1 + i2, j1 b2 + j2] = A[i1, j1] B[i2, j2]``
  (``torch.kron``). With torch's row-major reshape ``X = x.reshape(a2, b2)``:
  ``(A (x) B) x = (A X B^T).reshape(a1 b1)``. (This is the textbook ``vec(B X' A^T)`` identity written for
  row-major ``vec``, where ``X' = X^T``.)
* LDR of displacement rank k: ``sum_{i<k} circ(g_i) skew(h_i)``.

Rectangular matrices: circulant and LDR are defined square of size ``n = max(d_in, d_out)``; a d_out x d_in
operator is its top-left block, applied by zero-padding x to n and keeping the first d_out outputs. Every
parameter still reaches the block (each ``v[k]`` appears in it, since the block spans n rows or n columns).
Toeplitz and Kronecker are rectangular by definition.

FFT paths compute in float32 (float64 for float64 inputs) with autocast disabled -- half-precision FFTs lose too
much and only allow powers of two -- and cast the result back to the input's dtype.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .base import ConfigError
from .fast_paths import fast_path_wanted, forced_path

# --- helpers ---------------------------------------------------------------------------------------------------


def next_fast_fft_length(n: int) -> int:
    """The smallest integer >= n whose only prime factors are 2, 3 and 5 (fast for every FFT backend)."""
    if n < 1:
        raise ValueError(f"FFT length must be positive, got {n}")
    candidate = n
    while True:
        remainder = candidate
        for prime in (2, 3, 5):
            while remainder % prime == 0:
                remainder //= prime
        if remainder == 1:
            return candidate
        candidate += 1


#: Device types with an autocast to disable. A fixed set, not ``torch.amp.is_autocast_available``: dynamo skips
#: that function, so calling it broke the graph at every FFT under ``torch.compile`` (35 breaks on the H100 run).
AUTOCAST_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu"})


@contextlib.contextmanager
def float32_fft_region(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device`` so the FFTs inside run in the float32 the caller casts to."""
    if device.type in AUTOCAST_DEVICE_TYPES:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def fft_dtype(x: torch.Tensor) -> torch.dtype:
    """The real dtype FFTs run in: float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --- functional forms ------------------------------------------------------------------------------------------


def circulant_matrix(v: torch.Tensor) -> torch.Tensor:
    """``circ(v)`` materialised: n x n with ``[i, j] = v[(i - j) mod n]`` (first column v)."""
    n = v.shape[-1]
    index = torch.arange(n, device=v.device)
    return v[(index[:, None] - index[None, :]) % n]


def skew_circulant_matrix(h: torch.Tensor) -> torch.Tensor:
    """``skew(h)`` materialised: ``[i, j] = h[i - j]`` if ``i >= j`` else ``-h[n + i - j]`` (first column h)."""
    n = h.shape[-1]
    index = torch.arange(n, device=h.device)
    difference = index[:, None] - index[None, :]
    sign = torch.where(difference >= 0, 1.0, -1.0).to(h.dtype)
    return h[difference % n] * sign


def toeplitz_matrix(t: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """``T(t)`` materialised: d_out x d_in with ``[i, j] = t[i - j + d_in - 1]``."""
    if t.shape[-1] != d_out + d_in - 1:
        raise ValueError(f"a {d_out} x {d_in} Toeplitz matrix has {d_out + d_in - 1} parameters, got {t.shape[-1]}")
    rows = torch.arange(d_out, device=t.device)
    cols = torch.arange(d_in, device=t.device)
    return t[rows[:, None] - cols[None, :] + d_in - 1]


# --- dense forms for training on the fast path: few kernels, nothing saved ----------------------------------------


class _ToeplitzFromVector(torch.autograd.Function):
    """``M[i, j] = u[rows - 1 - i + j]`` (rows x cols, ``u`` of length ``rows + cols - 1``): a flipped Hankel view of
    u, copied. Backward: ``du[q] = sum_{rows - 1 - i + j = q} G[i, j]``, the anti-diagonal sums of the row-flipped
    gradient, read through a strided view of it padded by ``rows`` columns (row r shifted right by r). A handful of
    kernels each way and nothing saved, where an index gather's backward scatters ``rows * cols`` gradients."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        ctx.rows, ctx.cols = rows, cols
        u = u.contiguous()
        return u.as_strided((rows, cols), (1, 1), u.storage_offset()).flip(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        rows, cols = ctx.rows, ctx.cols
        width = rows + cols
        padded = F.pad(grad.flip(0), (0, rows)).contiguous()  # (rows, cols + rows), zeros on the right
        shifted = padded.as_strided((rows, width), (width - 1, 1))  # [r, c] = flipped G[r, c - r], or a zero
        return shifted.sum(0)[: width - 1], None, None


def toeplitz_block(u: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``M[i, j] = u[rows - 1 - i + j]`` (rows x cols, differentiable; see :class:`_ToeplitzFromVector`)."""
    return _ToeplitzFromVector.apply(u, rows, cols)


def circulant_block(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``circ(v)[:rows, :cols]`` as :func:`toeplitz_block` of ``u[p] = v[(rows - 1 - p) mod n]``, a slice of the
    reversed ``[v, v]`` (rows, cols <= n). Equal to :func:`circulant_matrix`'s block, exactly."""
    n = v.shape[-1]
    u = torch.cat([v, v]).flip(0)[n - rows : n + cols - 1]
    return toeplitz_block(u, rows, cols)


def skew_circulant_block(h: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``skew(h)[:rows, :cols]``: a Toeplitz matrix with ``s[d] = h[d]`` (d >= 0), ``-h[n + d]`` (d < 0) on its
    diagonals, i.e. :func:`toeplitz_block` of a slice of the reversed ``[-h, h]``. Equal to
    :func:`skew_circulant_matrix`'s block, exactly."""
    n = h.shape[-1]
    u = torch.cat([-h, h]).flip(0)[n - rows : n + cols - 1]
    return toeplitz_block(u, rows, cols)


#: On CPU the FFT paths run over blocks of rows of about this many elements: intermediates that fit the cache
#: (and come from the allocator's free lists instead of fresh, page-faulting memory) make the FFT path 2-4x
#: faster at SD widths than one pass over tens of megabytes. GPUs run the whole batch at once.
CPU_ROW_BLOCK_ELEMENTS = 1 << 19


def _over_row_blocks(fn, x: torch.Tensor, width: int) -> torch.Tensor:
    """``fn`` applied to x (..., d) -- on CPU block by block over the flattened rows, each block about
    ``CPU_ROW_BLOCK_ELEMENTS / width`` rows (``width``: the widest intermediate per row)."""
    rows = x.reshape(-1, x.shape[-1])
    block = max(1, CPU_ROW_BLOCK_ELEMENTS // width)
    if x.device.type != "cpu" or rows.shape[0] <= block:
        return fn(x)
    out = torch.cat([fn(part) for part in rows.split(block)], dim=0)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def circulant_apply(v: torch.Tensor, x: torch.Tensor, d_out: int) -> torch.Tensor:
    """``circ(v)[:d_out, :d_in] x = irfft(rfft(pad_n(x)) * rfft(v))[:d_out]`` (float32 or wider).
    ``v``: (n,), ``x``: (..., d_in) with d_in, d_out <= n."""
    n = v.shape[-1]
    dtype = fft_dtype(x)
    with float32_fft_region(x.device):
        v_spectrum = torch.fft.rfft(v.to(dtype))

        def apply(rows: torch.Tensor) -> torch.Tensor:
            return torch.fft.irfft(torch.fft.rfft(rows, n=n) * v_spectrum, n=n)[..., :d_out]

        y = _over_row_blocks(apply, x.to(dtype), n)
    return y.to(x.dtype)


def toeplitz_apply(t: torch.Tensor, x: torch.Tensor, d_out: int) -> torch.Tensor:
    """``T(t) x`` by FFT through the circulant embedding of fast length ``L >= d_out + d_in - 1`` (float32 or
    wider): ``irfft(rfft(x, L) * rfft(t, L))[d_in - 1 : d_in - 1 + d_out]``. ``t``: (d_out + d_in - 1,),
    ``x``: (..., d_in)."""
    d_in = x.shape[-1]
    length = next_fast_fft_length(d_out + d_in - 1)
    dtype = fft_dtype(x)
    with float32_fft_region(x.device):
        t_spectrum = torch.fft.rfft(t.to(dtype), n=length)

        def apply(rows: torch.Tensor) -> torch.Tensor:
            return torch.fft.irfft(torch.fft.rfft(rows, n=length) * t_spectrum, n=length)[
                ..., d_in - 1 : d_in - 1 + d_out
            ]

        y = _over_row_blocks(apply, x.to(dtype), length)
    return y.to(x.dtype)


#: :func:`_skew_modulation`'s constants by (n, device, dtype): a handful of n-vectors, built once instead of five
#: kernels per call (on a GPU the training steps are bound by launching kernels, and LDR needs it per layer twice).
_SKEW_MODULATIONS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _skew_modulation(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``w^t = exp(i pi t / n)`` for t < n (the diagonal M of ``skew(h) = M^-1 circ(M h) M``), complex of ``dtype``.
    A constant, cached per (n, device, dtype) -- except while ``torch.compile`` traces, which folds it itself."""
    if torch.compiler.is_compiling():
        return _build_skew_modulation(n, device, dtype)
    key = (n, torch.device(device), dtype)
    cached = _SKEW_MODULATIONS.get(key)
    if cached is None:
        # A normal tensor even when first asked for under inference_mode: autograd may save it later.
        with torch.inference_mode(False), torch.no_grad():
            cached = _SKEW_MODULATIONS[key] = _build_skew_modulation(n, device, dtype)
    return cached


def _build_skew_modulation(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    angle = torch.arange(n, device=device, dtype=torch.float64) * (math.pi / n)
    return torch.polar(torch.ones_like(angle), angle).to(
        torch.complex128 if dtype == torch.float64 else torch.complex64
    )


def skew_circulant_apply(h: torch.Tensor, x: torch.Tensor, d_out: int) -> torch.Tensor:
    """``skew(h)[:d_out, :d_in] x = (conj(w^t) ifft(fft(w^t h) fft(w^t pad_n(x)))).real[:d_out]`` (float32 or
    wider)."""
    n = h.shape[-1]
    dtype = fft_dtype(x)
    with float32_fft_region(x.device):
        modulation = _skew_modulation(n, x.device, dtype)
        h_spectrum = torch.fft.fft(modulation * h.to(dtype))

        def apply(rows: torch.Tensor) -> torch.Tensor:
            rows = torch.nn.functional.pad(rows, (0, n - rows.shape[-1]))
            return (modulation.conj() * torch.fft.ifft(torch.fft.fft(modulation * rows) * h_spectrum)).real[
                ..., :d_out
            ]

        y = _over_row_blocks(apply, x.to(dtype), 2 * n)
    return y.to(x.dtype)


def ldr_apply(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor, d_out: int) -> torch.Tensor:
    """``(sum_i circ(g_i) skew(h_i))[:d_out, :d_in] x`` by FFT (float32 or wider), O(k n log n) per row of x.

    ``g``, ``h``: (k, n). The spectrum of the modulated x is computed once; each term needs one inverse complex
    FFT (back from the skew-circulant's modulated domain) and one real FFT (into the circulant's domain); the k
    circulant products are summed in the frequency domain so only one inverse real FFT remains.
    """
    n = h.shape[-1]
    rank = h.shape[0]
    dtype = fft_dtype(x)
    with float32_fft_region(x.device):
        modulation = _skew_modulation(n, x.device, dtype)
        h_spectrum = torch.fft.fft(modulation * h.to(dtype))  # (k, n)
        g_spectrum = torch.fft.rfft(g.to(dtype))  # (k, n // 2 + 1)

        def apply(rows: torch.Tensor) -> torch.Tensor:
            rows = torch.nn.functional.pad(rows, (0, n - rows.shape[-1]))
            x_spectrum = torch.fft.fft(modulation * rows).unsqueeze(-2)  # (..., 1, n)
            skew_out = (modulation.conj() * torch.fft.ifft(x_spectrum * h_spectrum)).real  # (..., k, n)
            summed = (torch.fft.rfft(skew_out) * g_spectrum).sum(dim=-2)  # (..., n // 2 + 1)
            return torch.fft.irfft(summed, n=n)[..., :d_out]

        y = _over_row_blocks(apply, x.to(dtype), 2 * rank * n)
    return y.to(x.dtype)


def _skew_rows(u: torch.Tensor, d_in: int, n: int) -> torch.Tensor:
    """``skew(h_i)[:, :d_in]^T`` for each row of ``u = [-h[:, n - d_in + 1:], h]`` (k, n + d_in - 1): (k, d_in, n)
    with ``[i, l, a] = h_i[a - l]`` if a >= l else ``-h_i[n + a - l]`` -- the flipped Hankel view of u, copied."""
    return u.as_strided((u.shape[0], d_in, n), (u.shape[1], 1, 1)).flip(1)


class _LDRDenseByFFT(torch.autograd.Function):
    """``M = (sum_i circ(g_i) skew(h_i))[:d_out, :d_in]`` by FFT convolution (see :func:`ldr_dense_by_fft`), with a
    hand-written backward that keeps only g's spectrum and the skew factor's diagonals (``u``, n + d_in - 1 values
    per term) and forms the skew factor's spectrum again: no checkpoint, nothing n x n kept, and few kernels each
    way. With ``T_i = skew(h_i)[:, :d_in]^T`` (d_in x n), the
    forward is ``M^T = sum_i T_i (*) g_i`` (circular convolution along rows, first d_out columns). For ``D`` =
    dL/dM^T zero-padded to n columns, the correlation theorem gives ``dT_i = irfft(rfft(D) conj(rfft(g_i)))`` and
    ``dg_i = irfft(sum_rows conj(rfft(T_i)) rfft(D))``; ``dh_i`` sums ``dT_i`` along its diagonals (a strided view
    of it padded on both sides), the wrapped ones negated."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, h: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
        n = h.shape[-1]
        g_spectrum = torch.fft.rfft(g)  # (k, n // 2 + 1)
        diagonals = torch.cat([-h[:, n - d_in + 1 :], h], dim=1)  # u: (k, n + d_in - 1)
        products = torch.fft.rfft(_skew_rows(diagonals, d_in, n)) * g_spectrum.unsqueeze(1)  # (k, d_in, n // 2 + 1)
        spectrum = products[0] if products.shape[0] == 1 else products.sum(0)
        ctx.save_for_backward(g_spectrum, diagonals)
        ctx.d_out, ctx.d_in, ctx.n = d_out, d_in, n
        return torch.fft.irfft(spectrum, n=n)[:, :d_out].transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        # Only FFTs, pads, products and sums: none of them is one autocast would lower, so no float32 region here
        g_spectrum, diagonals = ctx.saved_tensors
        d_out, d_in, n = ctx.d_out, ctx.d_in, ctx.n
        rank = diagonals.shape[0]
        grad_spectrum = torch.fft.rfft(F.pad(grad.transpose(0, 1), (0, n - d_out)))  # (d_in, n // 2 + 1)
        skew_spectrum = torch.fft.rfft(_skew_rows(diagonals, d_in, n))
        grad_g = torch.fft.irfft((skew_spectrum.conj() * grad_spectrum).sum(1), n=n)  # (k, n)
        grad_rows = torch.fft.irfft(grad_spectrum * g_spectrum.conj().unsqueeze(1), n=n)  # dT: (k, d_in, n)
        # du[q] = sum_l dT[l, l + q - (d_in - 1)]: with d_in - 1 zeros on each side (width w), row l read from
        # column l + q, i.e. strides (w + 1, 1) over the padded rows.
        padded = F.pad(grad_rows, (d_in - 1, d_in - 1))
        width = padded.shape[-1]
        length = n + d_in - 1
        grad_u = padded.as_strided((rank, d_in, length), (d_in * width, width + 1, 1)).sum(1)  # (k, n + d_in - 1)
        # u = [-h[n - d_in + 1:], h]: h's own entries, less the negated wrap-around ones
        grad_h = grad_u[:, d_in - 1 :] - F.pad(grad_u[:, : d_in - 1], (n - d_in + 1, 0))
        return grad_g, grad_h, None, None


def ldr_dense_by_fft(g: torch.Tensor, h: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """``(sum_i circ(g_i) skew(h_i))[:d_out, :d_in]`` formed in O(k n^2 log n) (float32 or wider, autocast off).

    Column l of ``circ(g) skew(h)`` is circ(g) applied to column l of skew(h), a circular convolution with g, so
    ``M^T = irfft(sum_i rfft(skew(h_i)[:, :d_in]^T) * rfft(g_i))[:, :d_out]``: each skew factor's first d_in columns
    as rows (a strided view of ``[-h_i[n - d_in + 1:], h_i]``), one real FFT of them, the k terms summed as spectra,
    one inverse FFT. The product of the two strided n x n factors it replaces costs O(k n^3) multiply-adds in
    float32 (4.2 GFLOP per 1280-wide layer and pass, off the GPU's half-precision tensor cores: run 3's LDR
    ``fold``, 29 ms of kernels per SD 1.5 step). ``g``, ``h``: (k, n). Returns a (d_out, d_in) view of a
    (d_in, d_out) tensor; its backward is :class:`_LDRDenseByFFT`'s.
    """
    dtype = fft_dtype(h)
    with float32_fft_region(h.device):
        return _LDRDenseByFFT.apply(g.to(dtype), h.to(dtype), d_out, d_in)


def dense_apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix x`` for a materialised structured matrix, in float32 or wider like the FFT paths (autocast off)."""
    dtype = fft_dtype(x)
    with float32_fft_region(x.device):
        y = torch.nn.functional.linear(x.to(dtype), matrix.to(dtype))
    return y.to(x.dtype)


def _n_log_n(n: int) -> float:
    return n * math.log2(max(n, 2))


def kronecker_apply(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(A (x) B) x`` without forming the product: ``(A X B^T).reshape(..., a1 b1)`` with
    ``X = x.reshape(..., a2, b2)``."""
    a1, a2 = a.shape
    b1, b2 = b.shape
    a = a.to(x.dtype)
    b = b.to(x.dtype)
    grid = x.reshape(-1, a2, b2)
    # Two large matmuls rather than one small one per row: X B^T over all rows at once ((rows a2) x b2 x b1),
    # then A over the a2 axis of every row at once (a1 x a2 x (rows b1)).
    right = torch.matmul(grid, b.transpose(0, 1))
    y = torch.einsum("ij,njk->nik", a, right)
    return y.reshape(*x.shape[:-1], a1 * b1)


# --- kronecker factor shapes -----------------------------------------------------------------------------------


def default_kronecker_factor(n: int) -> int:
    """The largest divisor of n that is <= sqrt(n): near-square factors minimise ``a1 a2 + b1 b2`` in practice."""
    return max(d for d in divisors(n) if d * d <= n)


def resolve_kronecker_factors(
    d_out: int, d_in: int, out_factor: int = 0, in_factor: int = 0
) -> tuple[int, int, int, int]:
    """``(a1, a2, b1, b2)`` with ``a1 b1 = d_out`` and ``a2 b2 = d_in``; a factor of 0 means the default.

    Raises :class:`ConfigError` listing the valid choices when a given factor does not divide its dim.
    """
    problems = []
    for label, dim, factor in (
        ("out_factor (a1, rows of A)", d_out, out_factor),
        ("in_factor (a2, columns of A)", d_in, in_factor),
    ):
        if factor < 0 or (factor > 0 and dim % factor != 0):
            problems.append(
                f"{label}={factor} does not divide {dim}; valid values: {divisors(dim)} (or 0 for automatic)"
            )
    if problems:
        raise ConfigError(
            f"Kronecker factors for a {d_out} x {d_in} weight (A (x) B needs a1*b1 = {d_out}, a2*b2 = {d_in}): "
            + "; ".join(problems)
            + f". The automatic choice is out_factor={default_kronecker_factor(d_out)}, "
            f"in_factor={default_kronecker_factor(d_in)}."
        )
    a1 = out_factor or default_kronecker_factor(d_out)
    a2 = in_factor or default_kronecker_factor(d_in)
    return a1, a2, d_out // a1, d_in // a2


# --- modules ---------------------------------------------------------------------------------------------------

#: Initialisations of a structured matrix: "zero" (the matrix is exactly 0, only one factor is zeroed) or
#: "random" (every factor uniform in +-1/sqrt(fan_in), LoRA's down-projection scale).
INITS = ("zero", "random")


def _uniform_(tensor: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(tensor, -bound, bound)


#: How a structured matrix is applied (:attr:`StructuredMatrix.path`): ``"auto"`` takes, per call, the cheaper of
#: its structured path (FFT, or matmuls with Kronecker's factors) and one dense matmul with the materialised matrix,
#: by :meth:`StructuredMatrix.structured_cost` / :meth:`StructuredMatrix.dense_cost`; the others force one path.
PATHS = ("auto", "structured", "dense")

#: CPU multiply-adds per row of an FFT path, per ``L log2 L`` (L: FFT length): rfft + spectrum product + irfft,
#: measured against dense matmuls on an x86 CPU with torch 2.13 (``benchmarks/perf/fft_paths.py``). At SD widths
#: the FFT wins from about 128 (circulant), 512 (Toeplitz, whose FFT is twice as long) and 400 (LDR).
FFT_COST_PER_ELEMENT = {"circulant": 30.0, "toeplitz": 25.0, "ldr": 50.0}


class StructuredMatrix(nn.Module, abc.ABC):
    """A d_out x d_in structured matrix M: ``forward(x) = M x`` (x: (..., d_in)), ``materialize() = M``.

    ``forward`` takes the structured path (:meth:`structured_forward`) or, where that is slower -- small widths
    on CPU, where a dense matmul beats an FFT of the same size, and every width on CUDA (the GPU fast path, see
    :mod:`resattn_diffusion.tuners.fast_paths`) -- a matmul with the materialised matrix; the two agree up to
    rounding. On CPU both compute in float32 (or wider) with autocast disabled; on CUDA the dense matmul runs in
    the activations' precision (autocast's, under autocast), like the frozen layers around it. ``path`` (see
    :data:`PATHS`) forces one of them.
    """

    #: "auto", "structured" or "dense" (per module; assign to change).
    path: str = "auto"
    #: The family's structured path is FFTs: :meth:`dense_matrix` can materialise M through it (see there).
    materializes_through_fft: ClassVar[bool] = False
    #: Whether the fast path forms M by the family's strided dense form (:meth:`strided_dense`: Toeplitz views of
    #: the parameters, a few kernels; LDR: its skew factor's view convolved with g by FFT) where it has one, rather
    #: than by its FFT path applied to the identity (some twenty kernels for LDR, each way). Class-wide; the GPU
    #: benchmark times both (``[run-2 dense]`` rows).
    use_strided_dense: bool = True
    #: Whether a dense form that would keep n x n intermediates for backward -- the FFT form's float32 complex
    #: spectra of the identity (up to 12 n^2 bytes per layer, LDR), the two strided factors of LDR's matmul form
    #: (8 n^2; :attr:`LDRMatrix.use_strided_matmul`) -- keeps nothing but the parameters and forms them again in
    #: backward (activation checkpointing; the same ops, so the same numbers). LDR's default strided form needs
    #: none: its own backward keeps only g's spectrum and the n + d_in - 1 diagonals. Kept, those intermediates
    #: add ~0.4-1.9 GB over SD 1.5's attention projections (README, GPU section).
    recompute_dense: bool = True

    def __init__(self, d_out: int, d_in: int):
        super().__init__()
        if d_out < 1 or d_in < 1:
            raise ConfigError(f"a structured matrix needs positive dims, got {d_out} x {d_in}")
        self.d_out = d_out
        self.d_in = d_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_dense_path(x):
            # The GPU fast path multiplies in the activations' dtype; by fast_path_wanted (not the device) so that
            # forced_paths("fast") runs that very code on CPU too. Otherwise float32 or wider, like the FFT paths.
            if fast_path_wanted(x.device.type):
                return F.linear(x, self.dense_matrix().to(x.dtype))
            return dense_apply(self.dense_matrix(), x)
        return self.structured_forward(x)

    def dense_matrix(self) -> torch.Tensor:
        """M for a forward pass: :meth:`materialize`, or -- for the FFT families when a gradient is wanted and the
        fast paths are (CUDA, or ``forced_paths("fast")``) -- M in a form whose backward suits a GPU: the index
        gather of ``materialize`` scatters n^2 gradients into n parameters (a sort or contended atomics per layer
        and step). That form is the family's :meth:`strided_dense` (Toeplitz views of the parameters, whose
        backward sums diagonals through strided views) where it has one and :attr:`use_strided_dense` is on, else
        its FFT path applied to the identity, ``M = structured_forward(I)^T``. All equal up to rounding; forms
        that keep n x n intermediates for backward run again there instead (:attr:`recompute_dense`)."""
        parameter = next(self.parameters(), None)
        if (
            self.materializes_through_fft
            and parameter is not None
            and torch.is_grad_enabled()
            and any(p.requires_grad for p in self.parameters())
            and fast_path_wanted(parameter.device.type)
        ):
            has_strided = type(self).strided_dense is not StructuredMatrix.strided_dense
            form = self.strided_dense if self.use_strided_dense and has_strided else self._dense_through_fft
            if self.recompute_dense and (form == self._dense_through_fft or self.strided_dense_saves_factors):
                return torch.utils.checkpoint.checkpoint(form, use_reentrant=False, preserve_rng_state=False)
            return form()
        return self.materialize()

    #: Its strided form keeps n x n factors for backward (LDR's matmul form), so :attr:`recompute_dense` applies.
    strided_dense_saves_factors: ClassVar[bool] = False

    def strided_dense(self) -> torch.Tensor:
        """M as a differentiable function of the parameters built from strided views (:func:`toeplitz_block`). The
        families with one override this; the others' form is the FFT one."""
        return self._dense_through_fft()

    def _dense_through_fft(self) -> torch.Tensor:
        """``M = structured_forward(I)^T``: the structured path applied to the d_in x d_in identity."""
        parameter = next(self.parameters())
        identity = torch.eye(self.d_in, device=parameter.device, dtype=parameter.dtype)
        return self.structured_forward(identity).transpose(0, 1)

    @abc.abstractmethod
    def structured_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``M x`` without materialising M (FFT, or Kronecker's factor matmuls)."""

    def structured_cost(self, rows: int) -> float:
        """Estimated CPU multiply-adds of :meth:`structured_forward` on ``rows`` rows."""
        return 0.0  # families without a cost model always take the structured path

    def dense_cost(self, rows: int) -> float:
        """Estimated CPU multiply-adds of materialising M and one dense matmul on ``rows`` rows."""
        return float(self.d_out * self.d_in) * (rows + 1)

    def uses_dense_path(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` multiplies by the materialised matrix: ``path`` if not ``"auto"``; else on CUDA
        (or under ``forced_paths("fast")``) always -- the GPU fast path; on CPU (or under
        ``forced_paths("reference")``) the CPU cost model, which was measured on CPU; other devices never."""
        if self.path == "auto":
            forced = forced_path()
            if forced == "fast" or (forced is None and x.device.type == "cuda"):
                return True
            if x.device.type != "cpu":
                return False
            rows = x.numel() // max(x.shape[-1], 1)
            return self.dense_cost(rows) < self.structured_cost(rows)
        if self.path not in PATHS:
            raise ConfigError(f"path={self.path!r} is not allowed; choose one of {list(PATHS)}")
        return self.path == "dense"

    def _check_init(self, init: str) -> None:
        if init not in INITS:
            raise ConfigError(f"init={init!r} is not allowed; choose one of {list(INITS)}")

    @abc.abstractmethod
    def materialize(self) -> torch.Tensor:
        """M as a dense d_out x d_in tensor (exact; for folding, tests and benchmarks)."""

    @staticmethod
    @abc.abstractmethod
    def count_parameters(d_out: int, d_in: int, **kwargs: int) -> int:
        """The number of parameters of a d_out x d_in matrix of this family (the documented formula)."""

    def extra_repr(self) -> str:
        return f"d_out={self.d_out}, d_in={self.d_in}"


class CirculantMatrix(StructuredMatrix):
    r"""``M = circ(v)[:d_out, :d_in]``, ``v`` of length ``n = max(d_in, d_out)``: n parameters, FFT in O(n log n).

    Init "zero": ``v = 0``. A single-factor family is linear in v, so ``dL/dv = sum_rows corr(g, x) != 0`` for
    x != 0 even at ``v = 0``.
    """

    materializes_through_fft = True

    def __init__(self, d_out: int, d_in: int, init: str = "zero"):
        super().__init__(d_out, d_in)
        self._check_init(init)
        self.size = max(d_out, d_in)
        self.v = nn.Parameter(torch.zeros(self.size))
        if init == "random":
            _uniform_(self.v, self.size)

    @staticmethod
    def count_parameters(d_out: int, d_in: int, **kwargs: int) -> int:
        return max(d_out, d_in)

    def structured_forward(self, x: torch.Tensor) -> torch.Tensor:
        return circulant_apply(self.v, x, self.d_out)

    def strided_dense(self) -> torch.Tensor:
        return circulant_block(self.v, self.d_out, self.d_in)

    def structured_cost(self, rows: int) -> float:
        return rows * FFT_COST_PER_ELEMENT["circulant"] * _n_log_n(self.size)

    def materialize(self) -> torch.Tensor:
        return circulant_matrix(self.v)[: self.d_out, : self.d_in]


class ToeplitzMatrix(StructuredMatrix):
    r"""``M = T(t)``, ``[i, j] = t[i - j + d_in - 1]``: ``d_out + d_in - 1`` parameters, FFT through a circulant
    embedding of fast length ``L >= d_out + d_in - 1``. Init "zero": ``t = 0`` (single factor, as for circulant)."""

    materializes_through_fft = True

    def __init__(self, d_out: int, d_in: int, init: str = "zero"):
        super().__init__(d_out, d_in)
        self._check_init(init)
        self.t = nn.Parameter(torch.zeros(d_out + d_in - 1))
        if init == "random":
            _uniform_(self.t, d_in)

    @staticmethod
    def count_parameters(d_out: int, d_in: int, **kwargs: int) -> int:
        return d_out + d_in - 1

    def structured_forward(self, x: torch.Tensor) -> torch.Tensor:
        return toeplitz_apply(self.t, x, self.d_out)

    def strided_dense(self) -> torch.Tensor:
        return toeplitz_block(self.t.flip(0), self.d_out, self.d_in)

    def structured_cost(self, rows: int) -> float:
        length = next_fast_fft_length(self.d_out + self.d_in - 1)
        return rows * FFT_COST_PER_ELEMENT["toeplitz"] * _n_log_n(length)

    def materialize(self) -> torch.Tensor:
        return toeplitz_matrix(self.t, self.d_out, self.d_in)


class KroneckerMatrix(StructuredMatrix):
    r"""``M = A (x) B``, ``A`` a1 x a2, ``B`` b1 x b2 with ``a1 b1 = d_out``, ``a2 b2 = d_in``: ``a1 a2 + b1 b2``
    parameters, applied as ``(A X B^T)`` on the row-major ``X = x.reshape(a2, b2)`` (never forming the product).

    Init "zero": ``A = 0`` and B random, so ``M = 0`` and
    ``dL/dA[i1, j1] = sum_{i2, j2} G[i1, i2] B[i2, j2] X[j1, j2]`` (i.e. ``G B X^T`` summed over rows) is non-zero; B
    gets its gradient once A has moved. Never both zero.
    """

    def __init__(self, d_out: int, d_in: int, init: str = "zero", out_factor: int = 0, in_factor: int = 0):
        super().__init__(d_out, d_in)
        self._check_init(init)
        a1, a2, b1, b2 = resolve_kronecker_factors(d_out, d_in, out_factor, in_factor)
        self.a = nn.Parameter(torch.zeros(a1, a2))
        self.b = nn.Parameter(torch.zeros(b1, b2))
        _uniform_(self.b, b2)
        if init == "random":
            _uniform_(self.a, a2)

    @staticmethod
    def count_parameters(d_out: int, d_in: int, out_factor: int = 0, in_factor: int = 0, **kwargs: int) -> int:
        a1, a2, b1, b2 = resolve_kronecker_factors(d_out, d_in, out_factor, in_factor)
        return a1 * a2 + b1 * b2

    def structured_forward(self, x: torch.Tensor) -> torch.Tensor:
        return kronecker_apply(self.a, self.b, x)

    def materialize(self) -> torch.Tensor:
        return torch.kron(self.a, self.b)

    def extra_repr(self) -> str:
        return f"d_out={self.d_out}, d_in={self.d_in}, A={tuple(self.a.shape)}, B={tuple(self.b.shape)}"


class LDRMatrix(StructuredMatrix):
    r"""Low displacement rank: ``M = (sum_{i<k} circ(g_i) skew(h_i))[:d_out, :d_in]``, ``g``, ``h``: k x n,
    ``n = max(d_in, d_out)``: ``2 k n`` parameters, O(k n log n) by FFT.

    (These sums are the low-displacement-rank matrices of Sindhwani et al., 2015, "Structured transforms for
    small-footprint deep learning": k bounds the displacement rank for the Sylvester operator built from the
    unit-circulant and unit-skew-circulant shifts; ``k = 1`` already contains every circulant and every
    skew-circulant matrix, and large k approaches a dense matrix.)

    Init "zero": ``g = 0``, h random, so ``M = 0`` and ``dL/dg_i = sum_rows corr(g_out, skew(h_i) x) != 0``;
    h gets its gradient once g has moved. Never both zero.
    """

    materializes_through_fft = True

    def __init__(self, d_out: int, d_in: int, init: str = "zero", displacement_rank: int = 1):
        super().__init__(d_out, d_in)
        self._check_init(init)
        if displacement_rank < 1:
            raise ConfigError(f"displacement_rank must be >= 1, got {displacement_rank}")
        self.size = max(d_out, d_in)
        self.g = nn.Parameter(torch.zeros(displacement_rank, self.size))
        self.h = nn.Parameter(torch.zeros(displacement_rank, self.size))
        _uniform_(self.h, self.size)
        if init == "random":
            # Each of the k terms adds its own variance: scale g down so the sum keeps the single-term scale.
            _uniform_(self.g, self.size * displacement_rank)

    @staticmethod
    def count_parameters(d_out: int, d_in: int, displacement_rank: int = 1, **kwargs: int) -> int:
        return 2 * displacement_rank * max(d_out, d_in)

    def structured_forward(self, x: torch.Tensor) -> torch.Tensor:
        return ldr_apply(self.g, self.h, x, self.d_out)

    @property
    def strided_dense_saves_factors(self) -> bool:  # type: ignore[override]
        # the FFT form's backward keeps g's spectrum and u; the matmul form would keep both n x n factors
        return self.use_strided_matmul

    #: Form M by the float32 matmul of its two strided n x n factors (run 3's form, O(k n^3)) instead of by FFT
    #: convolution (class-wide; the GPU benchmark times both, ``[run-3 dense]`` rows).
    use_strided_matmul: bool = False

    def strided_dense(self) -> torch.Tensor:
        """``sum_i circ(g_i)[:d_out, :] skew(h_i)[:, :d_in]``: each skew factor strided from h, multiplied by its
        circulant as a circular convolution (:func:`ldr_dense_by_fft`, float32, autocast off: a half-precision
        product of n terms would lose what the FFT form keeps). GPU run 3 measured the float32 matmul of the two
        strided n x n factors instead, O(k n^3); :attr:`use_strided_matmul` brings that back for comparison."""
        if self.use_strided_matmul:
            with float32_fft_region(self.g.device):
                terms = [
                    circulant_block(g, self.d_out, self.size) @ skew_circulant_block(h, self.size, self.d_in)
                    for g, h in zip(self.g, self.h)
                ]
            return terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)
        return ldr_dense_by_fft(self.g, self.h, self.d_out, self.d_in)

    def structured_cost(self, rows: int) -> float:
        return rows * self.g.shape[0] * FFT_COST_PER_ELEMENT["ldr"] * _n_log_n(self.size)

    def dense_cost(self, rows: int) -> float:
        # materialising is k products of n x n matrices
        return float(self.d_out * self.d_in) * rows + self.g.shape[0] * float(self.size) ** 3

    def materialize(self) -> torch.Tensor:
        total = sum(circulant_matrix(g) @ skew_circulant_matrix(h) for g, h in zip(self.g, self.h))
        return total[: self.d_out, : self.d_in]

    def extra_repr(self) -> str:
        return f"d_out={self.d_out}, d_in={self.d_in}, displacement_rank={self.g.shape[0]}"


STRUCTURES: dict[str, type[StructuredMatrix]] = {
    "circulant": CirculantMatrix,
    "toeplitz": ToeplitzMatrix,
    "kronecker": KroneckerMatrix,
    "ldr": LDRMatrix,
}
