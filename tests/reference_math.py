"""SPEC.md's formulas written out by hand, for the reference tests (``test_reference_*.py``).

Nothing here imports the library: attention is a loop over heads with an explicit softmax and ``1/sqrt(head_dim)``,
structured matrices are built entry by entry (``torch.roll`` or index loops), activations are their textbook
formulas. The tests read a module's *parameters* and compare its output with these.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` as a plain matmul."""
    out = x @ weight.transpose(0, 1)
    return out if bias is None else out + bias


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """``exp(s - max) / sum exp(s - max)`` over the last axis (the keys)."""
    shifted = scores - scores.max(dim=-1, keepdim=True).values
    weights = torch.exp(shifted)
    return weights / weights.sum(dim=-1, keepdim=True)


def mha(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``MHA_h``: per head ``softmax(q_h k_h^T / sqrt(dh) + bias) v_h``, heads concatenated.

    q (B, N, h dh), k (B or 1, M, h dh), v (B or 1, M, h dv) -> (B, N, h dv); ``bias`` (B, N or 1, M): the same
    additive mask for every head (-inf or a large negative number on a masked key)."""
    head_dim = q.shape[-1] // heads
    value_dim = v.shape[-1] // heads
    outs = []
    for head in range(heads):
        q_h = q[..., head * head_dim : (head + 1) * head_dim]
        k_h = k[..., head * head_dim : (head + 1) * head_dim]
        v_h = v[..., head * value_dim : (head + 1) * value_dim]
        scores = q_h @ k_h.transpose(-1, -2) / math.sqrt(head_dim)
        if bias is not None:
            scores = scores + bias
        outs.append(softmax(scores) @ v_h)
    return torch.cat(outs, dim=-1)


#: Activations by their formulas (erf-GELU, as torch's default).
ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "silu": lambda x: x / (1.0 + torch.exp(-x)),
    "tanh": lambda x: (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)),
    "identity": lambda x: x,
}


def circulant(v: torch.Tensor) -> torch.Tensor:
    """``circ(v)[i, j] = v[(i - j) mod n]``: column j is v rolled down by j."""
    return torch.stack([torch.roll(v, shifts=j) for j in range(v.shape[0])], dim=1)


def skew_circulant(h: torch.Tensor) -> torch.Tensor:
    """``skew(h)[i, j] = h[i - j]`` (i >= j), ``-h[n + i - j]`` (i < j): the circulant, wrapped part negated."""
    n = h.shape[0]
    columns = []
    for j in range(n):
        column = torch.roll(h, shifts=j)
        sign = torch.ones(n, dtype=h.dtype)
        sign[:j] = -1.0
        columns.append(column * sign)
    return torch.stack(columns, dim=1)


def toeplitz(t: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """``T(t)[i, j] = t[i - j + d_in - 1]``, built row by row: row i is ``t[i : i + d_in]`` reversed
    (j = 0 reads ``t[i + d_in - 1]``, j = d_in - 1 reads ``t[i]``)."""
    assert t.shape[0] == d_out + d_in - 1
    return torch.stack([torch.flip(t[i : i + d_in], dims=[0]) for i in range(d_out)])


def kronecker(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A (x) B``: the block matrix whose (i1, j1) block is ``A[i1, j1] B``."""
    return torch.cat([torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])], dim=0)


def structured_dense(matrix: nn.Module, d_out: int, d_in: int) -> torch.Tensor:
    """The d_out x d_in matrix a SURM structured module stands for, from its parameters only (the conventions of
    SPEC.md / ``tuners/structured.py``'s docstring; circulant and LDR: the top-left block of the n x n matrix)."""
    kind = type(matrix).__name__
    if kind == "CirculantMatrix":
        return circulant(matrix.v)[:d_out, :d_in]
    if kind == "ToeplitzMatrix":
        return toeplitz(matrix.t, d_out, d_in)
    if kind == "KroneckerMatrix":
        assert matrix.a.shape[0] * matrix.b.shape[0] == d_out and matrix.a.shape[1] * matrix.b.shape[1] == d_in
        return kronecker(matrix.a, matrix.b)
    if kind == "LDRMatrix":
        total = sum(circulant(g) @ skew_circulant(h) for g, h in zip(matrix.g, matrix.h))
        return total[:d_out, :d_in]
    raise AssertionError(f"no reference for the structured family {kind}: write one before testing it")


def res_attn_reference(
    tuner: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor,
    heads: int,
    swap_kv: bool = False,
    bias: torch.Tensor | None = None,
):
    """``W_up MHA_h(x A_q, c A_k, c A_v)`` (keys masked by the additive ``bias``, as in :func:`mha`); the k and v
    projections are the first and second r rows of kv_proj."""
    rank = tuner.q_proj.weight.shape[0]
    a_k, a_v = tuner.kv_proj.weight[:rank], tuner.kv_proj.weight[rank:]
    if swap_kv:
        a_k, a_v = a_v, a_k
    q, k, v = linear(x, tuner.q_proj.weight), linear(c, a_k), linear(c, a_v)
    return linear(mha(q, k, v, heads, bias), tuner.out_proj.weight)


def glora_supports(tuner: nn.Module, config: dict[str, str], d_out: int, d_in: int) -> dict[str, torch.Tensor]:
    """A, B (d_out x d_in), C (d_in), D, E (d_out) of a GLoRA module in the forms ``config`` names (absent: 0).

    lora<r> uses the first r components of the held factors (``up[:, :r] @ down[:r]``)."""
    dtype = next(tuner.parameters()).dtype
    shapes = {"A": (d_out, d_in), "B": (d_out, d_in), "C": (d_in,), "D": (d_out,), "E": (d_out,)}
    out = {}
    for support, form in config.items():
        zeros = torch.zeros(shapes[support], dtype=dtype)
        if form == "none":
            out[support] = zeros
        elif form.startswith("lora"):
            rank = int(form[4:])
            up = getattr(tuner, f"{support}_lora_up")[:, :rank]
            down = getattr(tuner, f"{support}_lora_down")[:rank]
            product = up @ down
            out[support] = product[:, 0] if support == "C" else product
        elif form == "vector":
            vector = getattr(tuner, f"{support}_vector")
            out[support] = zeros + (vector[:, None] if support in "AB" else vector)  # A, B: one value per output row
        elif form == "scalar":
            out[support] = zeros + getattr(tuner, f"{support}_scalar")
        else:
            raise AssertionError(f"unknown GLoRA form {form!r}")
    return out


def glora_delta(
    supports: dict[str, torch.Tensor], w0: torch.Tensor, b0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC: ``W' = W0 + W0 ⊙ A + B``, ``b' = b0 + b0 ⊙ D + E + W0 C``; returns ``(W' - W0, b' - b0)``."""
    b0 = torch.zeros(w0.shape[0], dtype=w0.dtype) if b0 is None else b0
    w_new = w0 + w0 * supports["A"] + supports["B"]
    b_new = b0 + b0 * supports["D"] + supports["E"] + w0 @ supports["C"]
    return w_new - w0, b_new - b0


def randomize(module: nn.Module, seed: int, std: float = 0.5) -> None:
    """Every parameter of ``module`` to seeded normal noise (zero init would hide a wrong formula)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * std)


def seeded(*shape: int, seed: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std


def assert_same_function(
    run, reference, parameters, seed: int = 99, rtol: float = 1e-9, atol: float = 1e-10
) -> torch.Tensor:
    """``run()`` equals ``reference()``, and so do the gradients of a random linear functional of them with
    respect to ``parameters``; returns the output."""
    out = run()
    expected = reference()
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    weights = seeded(*out.shape, seed=seed)
    grads = torch.autograd.grad((out * weights).sum(), parameters, allow_unused=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(), parameters, allow_unused=True)
    assert any(grad is not None for grad in grads)
    for grad, expected_grad in zip(grads, expected_grads):
        if grad is None or expected_grad is None:  # a supernet's parameters outside the active configuration
            assert grad is None or not grad.any()
            assert expected_grad is None or not expected_grad.any()
            continue
        torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol)
    return out
