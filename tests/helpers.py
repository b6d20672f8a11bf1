"""Input factories shared by the op tests."""

from __future__ import annotations

import torch

import rela_kernels as rk

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def loss_tolerance(dtype: torch.dtype, backend: str) -> dict:
    """CPU backends upcast the same 16-bit values, so losses agree to fp32 rounding; Triton on
    a GPU rounds the centred prior embeddings to the input dtype for the tensor cores."""
    if backend == "triton" and dtype != torch.float32:
        return {"rtol": 1e-2, "atol": 1e-2}
    return {"rtol": 1e-5, "atol": 1e-5}


def grad_tolerance(dtype: torch.dtype) -> dict:
    # 16-bit gradients are rounded once to the input dtype (relative step 2^-8 for bf16).
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-6}
    return {"rtol": 1e-2, "atol": 1e-3}


def strided(shape: tuple[int, int], dtype: torch.dtype, g: torch.Generator, layout: str):
    """A [rows, cols] tensor with the requested memory layout (same values either way)."""
    rows, cols = shape
    if layout == "contiguous":
        return torch.randn(rows, cols, generator=g).to(dtype)
    if layout == "transposed":  # column-major storage
        return torch.randn(cols, rows, generator=g).to(dtype).t()
    if layout == "sliced":  # every other column of a wider buffer
        return torch.randn(rows, 2 * cols, generator=g).to(dtype)[:, ::2]
    raise ValueError(layout)


def make_transport(dp: int, d: int, g: torch.Generator, bias: bool = True) -> rk.Transport:
    mean = torch.randn(dp, generator=g)
    matrix = torch.randn(dp, d, generator=g) / dp**0.5
    return rk.Transport(mean, matrix, torch.randn(d, generator=g) if bias else None)


def make_loss_inputs(
    b: int,
    d: int,
    dp: int,
    dtype: torch.dtype,
    g: torch.Generator,
    layout: str = "contiguous",
    bias: bool = True,
    zero_rows: bool = True,
):
    """z [b, d], p [b, dp] and a transport; with zero_rows, one z row is zero and (without bias)
    one target row is exactly zero, to exercise the eps clamps."""
    t = make_transport(dp, d, g, bias)
    z = strided((b, d), dtype, g, layout)
    p = strided((b, dp), dtype, g, layout)
    if zero_rows and b > 1:
        z[0] = 0
        if not bias:
            p[b - 1] = t.mean.to(dtype)
            # p - mean is exactly zero only if mean is representable in dtype.
            t = rk.Transport(p[b - 1].float(), t.matrix)
    return z, p, t
