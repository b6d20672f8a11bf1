"""Fused loss ops: every backend against the reference, the reference against float64 math."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import usable_backends
from helpers import (
    DTYPES,
    assert_grad_close,
    loss_tolerance,
    make_loss_inputs,
    make_transport,
    strided,
)

import rela_kernels as rk
from rela_kernels import reference

BACKENDS = usable_backends()
COMPILED = [b for b in BACKENDS if b != "reference"]
SIZES_B = (1, 3, 17, 257)
SIZES_D = (1, 7, 64, 257)
SIZES_DP = (5, 384)


def _triton_light(b: int, d: int, dp: int) -> bool:
    """The Triton interpreter is slow: keep its share of the grid small but varied."""
    return b * d * dp <= 17 * 64 * 384


def _grid(layouts=("contiguous",)):
    for backend, b, d, dp, dtype, layout in itertools.product(
        COMPILED, SIZES_B, SIZES_D, SIZES_DP, DTYPES, layouts
    ):
        if backend == "triton" and not _triton_light(b, d, dp):
            continue
        yield pytest.param(
            backend, b, d, dp, dtype, layout, id=f"{backend}-{b}x{d}x{dp}-{dtype}-{layout}"
        )


def _float64_loss(
    z: torch.Tensor, p: torch.Tensor, t: rk.Transport, eps: float = 1e-8
) -> np.ndarray:
    """Independent float64 computation in numpy."""
    z64 = z.double().numpy()
    y64 = (p.double().numpy() - t.mean.double().numpy()) @ t.matrix.double().numpy()
    if t.bias is not None:
        y64 = y64 + t.bias.double().numpy()
    dot = (z64 * y64).sum(axis=1)
    nz = np.maximum(np.linalg.norm(z64, axis=1), eps)
    ny = np.maximum(np.linalg.norm(y64, axis=1), eps)
    return 1.0 - dot / (nz * ny)


# ---------------------------------------------------------------------------------------------
# The reference against float64 math
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,d,dp", [(1, 1, 5), (3, 7, 5), (17, 64, 384), (257, 257, 384)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_float64(b, d, dp, dtype, bias, generator):
    z, p, t = make_loss_inputs(b, d, dp, dtype, generator, "transposed", bias)
    got = reference.transported_cosine_loss(z, p, t.mean, t.matrix, t.bias)
    assert got.dtype == torch.float32 and got.shape == (b,)
    np.testing.assert_allclose(got.numpy(), _float64_loss(z, p, t), rtol=1e-5, atol=2e-6)
    y = reference.transport(p, t.mean, t.matrix, t.bias)
    torch_cos = F.cosine_similarity(z.double(), y.double(), dim=1, eps=1e-8)
    np.testing.assert_allclose(got.numpy(), (1 - torch_cos).numpy(), rtol=1e-5, atol=2e-6)


def test_reference_gradcheck_float64(generator):
    z = torch.randn(6, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    y = torch.randn(6, 9, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda z_: reference.cosine_loss(z_, y), (z,))
    p = torch.randn(6, 5, dtype=torch.float64, generator=generator)
    mean = torch.randn(5, dtype=torch.float64, generator=generator)
    matrix = torch.randn(5, 9, dtype=torch.float64, generator=generator)
    bias = torch.randn(9, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(
        lambda z_: reference.transported_cosine_loss(z_, p, mean, matrix, bias), (z,)
    )


def test_reference_reduce_matches_definition(generator):
    loss = torch.rand(11, generator=generator)
    w = torch.rand(11, generator=generator)
    assert torch.allclose(reference.reduce_loss(loss, w, "none"), loss * w)
    assert torch.allclose(reference.reduce_loss(loss, w, "sum"), (loss * w).sum())
    assert torch.allclose(reference.reduce_loss(loss, w, "mean"), (loss * w).sum() / 11)
    assert torch.allclose(reference.reduce_loss(loss, None, "mean"), loss.mean())


# ---------------------------------------------------------------------------------------------
# Backends against the reference: forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,b,d,dp,dtype,layout", list(_grid(("contiguous",))))
def test_transported_loss_matches_reference(backend, b, d, dp, dtype, layout, generator):
    z, p, t = make_loss_inputs(b, d, dp, dtype, generator, layout, bias=(b % 2 == 1))
    want = reference.transported_cosine_loss(z, p, t.mean, t.matrix, t.bias)
    got = rk.transported_cosine_loss(z, p, t, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (b,) and got.device == z.device
    torch.testing.assert_close(got, want, **loss_tolerance(dtype, backend))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_non_contiguous_inputs(backend, layout, dtype, bias, generator):
    z, p, t = make_loss_inputs(17, 33, 40, dtype, generator, layout, bias)
    assert not z.is_contiguous() and not p.is_contiguous()
    want = reference.transported_cosine_loss(z, p, t.mean, t.matrix, t.bias)
    torch.testing.assert_close(
        rk.transported_cosine_loss(z, p, t, backend=backend), want, **loss_tolerance(dtype, backend)
    )
    y = strided((17, 33), dtype, generator, layout)
    torch.testing.assert_close(
        rk.cosine_loss(z, y, backend=backend),
        reference.cosine_loss(z, y),
        **loss_tolerance(dtype, backend),
    )
    torch.testing.assert_close(
        rk.transport(p, t, backend=backend),
        reference.transport(p, t.mean, t.matrix, t.bias),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("b,d,dp", [(1, 1, 5), (3, 7, 384), (17, 64, 5), (257, 257, 384)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transport_and_cosine_loss_match_reference(backend, b, d, dp, dtype, generator):
    if backend == "triton" and not _triton_light(b, d, dp):
        b = 17
    z, p, t = make_loss_inputs(b, d, dp, dtype, generator)
    y = reference.transport(p, t.mean, t.matrix, t.bias)
    got_y = rk.transport(p, t, backend=backend)
    assert got_y.dtype == torch.float32 and got_y.shape == (b, d)
    torch.testing.assert_close(got_y, y, rtol=1e-5, atol=1e-5)
    y16 = y.to(dtype)
    y16[-1] = 0  # a zero-norm target row
    torch.testing.assert_close(
        rk.cosine_loss(z, y16, backend=backend),
        reference.cosine_loss(z, y16),
        **loss_tolerance(dtype, backend),
    )


# ---------------------------------------------------------------------------------------------
# Gradients, weights and reductions
# ---------------------------------------------------------------------------------------------


def _grads(fn, z, upstream):
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    (grad,) = torch.autograd.grad(out, z, upstream)
    return out.detach(), grad


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,d,dp", [(1, 7, 5), (17, 64, 384), (257, 33, 40)])
def test_gradients_match_reference(backend, reduction, weighted, dtype, b, d, dp, generator):
    if backend == "triton" and not _triton_light(b, d, dp):
        b = 17
    # A zero row of z has the clamped-norm gradient -y / (eps |y|) ~ 1e8, outside float16's range:
    # the kernels keep the unscaled row gradient in z's dtype, so in float16 it is inf before the
    # upstream scale where the reference (scaling in float32 first) may still round to finite.
    z, p, t = make_loss_inputs(
        b, d, dp, dtype, generator, "sliced", zero_rows=dtype != torch.float16
    )
    weight = torch.rand(b, generator=generator) if weighted else None
    upstream = torch.randn(b, generator=generator) if reduction == "none" else torch.tensor(0.7)

    def fused(z_):
        return rk.transported_cosine_loss(
            z_, p, t, weight=weight, reduction=reduction, backend=backend
        )

    def spec(z_):
        loss = reference.transported_cosine_loss(z_, p, t.mean, t.matrix, t.bias)
        return reference.reduce_loss(loss, weight, reduction)

    got, got_grad = _grads(fused, z, upstream)
    want, want_grad = _grads(spec, z, upstream)
    torch.testing.assert_close(got, want, **loss_tolerance(dtype, backend))
    assert got_grad.dtype == dtype and got_grad.shape == z.shape
    assert_grad_close(got_grad, want_grad)
    # The zero row of z gets the clamped-norm gradient -y / (eps |y|), ~1e8: finite except in
    # float16, whose range ends at 65504 (the reference overflows the same way).
    if dtype != torch.float16:
        assert torch.isfinite(got_grad.float()).all()

    y = reference.transport(p, t.mean, t.matrix, t.bias).to(dtype)
    got, got_grad = _grads(
        lambda z_: rk.cosine_loss(z_, y, weight=weight, reduction=reduction, backend=backend),
        z,
        upstream,
    )
    want, want_grad = _grads(
        lambda z_: reference.reduce_loss(reference.cosine_loss(z_, y), weight, reduction),
        z,
        upstream,
    )
    torch.testing.assert_close(got, want, **loss_tolerance(dtype, backend))
    assert_grad_close(got_grad, want_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_paths_and_inputs_untouched(backend, generator):
    z, p, t = make_loss_inputs(9, 12, 20, torch.float32, generator)
    copies = [z.clone(), p.clone(), t.mean.clone(), t.matrix.clone(), t.bias.clone()]
    with torch.no_grad():
        a = rk.transported_cosine_loss(z.requires_grad_(True), p, t, backend=backend)
    assert a.grad_fn is None
    b = rk.transported_cosine_loss(z.detach(), p, t, backend=backend)
    torch.testing.assert_close(a, b)
    for before, after in zip(copies, [z, p, t.mean, t.matrix, t.bias], strict=True):
        assert torch.equal(before, after)


def test_backward_runs_once_per_row_gradient(generator):
    """The saved per-row gradient is scaled, not recomputed: two backward passes agree."""
    z, p, t = make_loss_inputs(5, 6, 7, torch.float32, generator, zero_rows=False)
    z.requires_grad_(True)
    loss = rk.transported_cosine_loss(z, p, t, reduction="sum")
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(g1, g2)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


def _op_args(generator, dtype=torch.float32, requires_grad=True, compute_grad=True):
    z, p, t = make_loss_inputs(5, 6, 7, dtype, generator, zero_rows=False)
    return z.requires_grad_(requires_grad), p, t, compute_grad


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck(backend, compute_grad, generator):
    prefix = "triton_" if backend == "triton" else ""
    ops = torch.ops.rela
    z, p, t, _ = _op_args(generator, requires_grad=compute_grad)
    y = reference.transport(p, t.mean, t.matrix, t.bias)
    torch.library.opcheck(
        getattr(ops, f"{prefix}transported_cosine_loss_fwd").default,
        (z, p, t.mean, t.matrix, t.bias, 1e-8, compute_grad),
    )
    torch.library.opcheck(
        getattr(ops, f"{prefix}cosine_loss_fwd").default, (z, y, 1e-8, compute_grad)
    )
    torch.library.opcheck(getattr(ops, f"{prefix}transport").default, (p, t.mean, t.matrix, None))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend, generator):
    if backend not in BACKENDS:
        pytest.fail(f"backend {backend} must be usable in the test environment")
    z, p, t = make_loss_inputs(17, 8, 12, torch.float32, generator, zero_rows=False)
    weight = torch.rand(17, generator=generator)

    def step(z_, p_, w_):
        loss = rk.transported_cosine_loss(z_, p_, t, weight=w_, reduction="mean", backend=backend)
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    eager = step(z1, p, weight)
    eager.backward()
    got = compiled(z2, p, weight)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(z2.grad, z1.grad)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, and nothing modified
# ---------------------------------------------------------------------------------------------


def _bad_cases(generator):
    z, p, t = make_loss_inputs(4, 3, 5, torch.float32, generator, zero_rows=False)
    other = make_transport(6, 3, generator)
    cases = [
        ("rank of z", dict(z=z[0]), ValueError, "z must be 2-D"),
        ("rank of p", dict(p=p[0]), ValueError, "p must be 2-D"),
        ("dtype of z", dict(z=z.double()), TypeError, "z must have dtype"),
        ("dtype of p", dict(p=p.to(torch.int32)), TypeError, "p must have dtype"),
        ("not a tensor", dict(z=[[1.0]]), TypeError, "z must be a torch.Tensor"),
        ("batch mismatch", dict(z=z[:3]), ValueError, "z must have 4 rows"),
        ("empty batch", dict(z=z[:0], p=p[:0]), ValueError, "at least one row"),
        ("z width", dict(z=torch.randn(4, 2)), ValueError, "z must have 3 columns"),
        ("p width", dict(t=other), ValueError, "p must have 6 columns"),
        ("transport type", dict(t="pca"), TypeError, "t must be an rk.Transport"),
        ("weight shape", dict(weight=torch.ones(3)), ValueError, "weight must have 4 entries"),
        ("weight dtype", dict(weight=torch.ones(4, dtype=torch.long)), TypeError, "weight"),
        ("reduction", dict(reduction="avg"), ValueError, "reduction must be"),
        ("eps", dict(eps=0.0), ValueError, "eps must be"),
        ("backend", dict(backend="metal"), ValueError, "backend must be one of"),
        (
            "non-finite z",
            dict(z=z.clone().index_fill_(0, torch.tensor([1]), float("nan"))),
            ValueError,
            "z must be finite",
        ),
        (
            "non-finite p",
            dict(p=p.clone().index_fill_(0, torch.tensor([2]), float("inf"))),
            ValueError,
            "p must be finite",
        ),
    ]
    return z, p, t, cases


def test_bad_input_transported(generator):
    z, p, t, cases = _bad_cases(generator)
    snapshot = [x.clone() for x in (z, p, t.mean, t.matrix, t.bias)]
    for label, override, error, message in cases:
        kwargs = dict(z=z, p=p, t=t)
        kwargs.update(override)
        with pytest.raises(error, match=message):
            rk.transported_cosine_loss(**kwargs)
        for before, after in zip(snapshot, (z, p, t.mean, t.matrix, t.bias), strict=True):
            assert torch.equal(before, after), label


def test_bad_input_cosine_and_transport(generator):
    z = torch.randn(4, 3, generator=generator)
    with pytest.raises(ValueError, match="y must have z's shape"):
        rk.cosine_loss(z, torch.randn(4, 2))
    with pytest.raises(TypeError, match="y must have dtype"):
        rk.cosine_loss(z, z.double())
    with pytest.raises(ValueError, match="y must be finite"):
        rk.cosine_loss(z, torch.full((4, 3), float("inf")))
    t = make_transport(5, 3, generator)
    with pytest.raises(ValueError, match="p must have 5 columns"):
        rk.transport(torch.randn(2, 4), t)
    with pytest.raises(ValueError, match="p must have at least one row"):
        rk.transport(torch.randn(0, 5), t)


def test_transport_device_mismatch_message(generator):
    t = make_transport(5, 3, generator)
    fake = rk.Transport(t.mean.to("meta"), t.matrix.to("meta"))
    with pytest.raises(ValueError, match="t is on meta but the inputs are on cpu"):
        rk.transport(torch.randn(2, 5), fake)
    with pytest.raises(
        ValueError, match="z is on cpu but p is on meta|p is on meta but z is on cpu"
    ):
        rk.transported_cosine_loss(torch.randn(2, 3), torch.randn(2, 5, device="meta"), t)


def test_forced_backend_that_cannot_run_here(monkeypatch):
    monkeypatch.setenv("RELA_BACKEND", "cuda")
    t = rk.Transport(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="backend 'cuda' is not usable here"):
        rk.transport(torch.ones(1, 2), t)
