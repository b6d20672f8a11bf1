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


# Gradient tolerance relative to each row's largest entry, and an absolute floor. The kernels
# store the unscaled row gradient in z's dtype and backward rounds it again after scaling: two
# roundings, up to 2 ulps (2^-6 relative in bfloat16, 2^-9 in float16), against the reference's
# one. float16 gradients of weighted means can be subnormal (below 2^-14), where the spacing is
# the absolute 2^-24.
GRAD_TOLERANCE = {
    torch.float32: (1e-5, 0.0),
    torch.bfloat16: (2.0**-6, 0.0),
    torch.float16: (2.0**-9, 4 * 2.0**-24),
}


def assert_grad_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Row gradients agree at the scale of each row.

    A row's gradient is a difference of two terms of size ~1/|z| (1/eps for a zero row), so an
    entry near zero carries the rounding of that scale, not its own: compare at the row's scale.
    """
    assert got.shape == want.shape and got.dtype == want.dtype
    rtol, atol = GRAD_TOLERANCE[got.dtype]
    got64, want64 = got.double(), want.double()
    scale = want64.abs().amax(dim=1, keepdim=True)
    excess = ((got64 - want64).abs() - rtol * scale - atol).max().item()
    err = ((got64 - want64).abs() / scale.clamp_min(1e-30)).max().item()
    assert excess <= 0, f"row-relative gradient error {err:.3g} (rtol {rtol:.3g}, atol {atol:.3g})"


def strided(
    shape: tuple[int, int],
    dtype: torch.dtype,
    g: torch.Generator,
    layout: str,
    device: torch.device | str = "cpu",
):
    """A [rows, cols] tensor with the requested memory layout (same values either way).

    Values are drawn on the CPU generator and the whole buffer moved before the view is taken,
    so a CUDA tensor keeps the layout (moving a strided view would make it contiguous)."""
    rows, cols = shape
    if layout == "contiguous":
        return torch.randn(rows, cols, generator=g).to(dtype).to(device)
    if layout == "transposed":  # column-major storage
        return torch.randn(cols, rows, generator=g).to(dtype).to(device).t()
    if layout == "sliced":  # every other column of a wider buffer
        return torch.randn(rows, 2 * cols, generator=g).to(dtype).to(device)[:, ::2]
    raise ValueError(layout)


def make_transport(
    dp: int, d: int, g: torch.Generator, bias: bool = True, device: torch.device | str = "cpu"
) -> rk.Transport:
    mean = torch.randn(dp, generator=g)
    matrix = torch.randn(dp, d, generator=g) / dp**0.5
    t = rk.Transport(mean, matrix, torch.randn(d, generator=g) if bias else None)
    return t.to(device)


def make_loss_inputs(
    b: int,
    d: int,
    dp: int,
    dtype: torch.dtype,
    g: torch.Generator,
    layout: str = "contiguous",
    bias: bool = True,
    zero_rows: bool = True,
    device: torch.device | str = "cpu",
):
    """z [b, d], p [b, dp] and a transport, all on ``device``; with zero_rows, one z row is zero
    and (without bias) one target row is exactly zero, to exercise the eps clamps."""
    t = make_transport(dp, d, g, bias, device)
    z = strided((b, d), dtype, g, layout, device)
    p = strided((b, dp), dtype, g, layout, device)
    if zero_rows and b > 1:
        z[0] = 0
        if not bias:
            p[b - 1] = t.mean.to(dtype)
            # p - mean is exactly zero only if mean is representable in dtype.
            t = rk.Transport(p[b - 1].float(), t.matrix)
    return z, p, t


def on_cpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU copies (same values and dtype) for the reference computation."""
    return [t.detach().cpu() for t in tensors]


def gpu_tolerance(dtype: torch.dtype, backend: str) -> dict:
    """Float32 outputs of a GPU backend against the CPU reference.

    The CUDA kernels compute in float32 from the same rounded inputs (the 1e-5 contract of the
    CPU kernels). Triton on a GPU runs the transport GEMM on 16-bit operands for 16-bit p (the
    centred p and the matrix are rounded to p's dtype), so its transported outputs differ by
    that rounding, about 2^-8 relative in bfloat16."""
    if backend == "triton" and dtype != torch.float32:
        return {"rtol": 2e-2, "atol": 2e-2}
    return {"rtol": 1e-5, "atol": 1e-5}
