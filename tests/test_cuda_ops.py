"""Every op on CUDA tensors, for each GPU backend (``cuda``, and ``triton`` compiled for the
device), against the reference computed on CPU copies of the same inputs: losses, transport,
gradients with weights and reductions, select_topk, score_and_select, StreamingTopK,
select_in_batch and the transport fits; non-contiguous, empty and degenerate inputs; bad input,
including a CPU tensor mixed with a CUDA one. Skipped with the reason where no device exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    DTYPES,
    assert_grad_close,
    gpu_tolerance,
    make_loss_inputs,
    make_transport,
    on_cpu,
    strided,
)
from test_fitting import anisotropic, numpy_whitening
from test_select_topk import KINDS, NAN_BITS, k_values, make_scores

import rela_kernels as rk
from rela_kernels import reference

pytestmark = pytest.mark.cuda

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _ieee_float32_matmul():
    """float32 GEMMs in full precision: Triton's float32 dot follows this flag."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _ref_transported(z, p, t):
    zc, pc = on_cpu(z, p)
    tc = t.to("cpu")
    return reference.transported_cosine_loss(zc, pc, tc.mean, tc.matrix, tc.bias)


# (b, d, dp, layout, bias): single rows and columns, the d-tiled path (d > 256), a batch that
# fills several programs, and each memory layout.
LOSS_CASES = [
    (1, 1, 5, "contiguous", True),
    (3, 7, 384, "transposed", False),
    (17, 64, 384, "sliced", True),
    (257, 300, 40, "transposed", True),
    (4099, 256, 768, "contiguous", False),
]


@pytest.mark.parametrize("b,d,dp,layout,bias", LOSS_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_and_transport_match_reference(
    gpu_backend, dtype, b, d, dp, layout, bias, generator
):
    z, p, t = make_loss_inputs(b, d, dp, dtype, generator, layout, bias, device=DEVICE)
    assert z.device.type == p.device.type == t.device.type == DEVICE
    assert layout == "contiguous" or not p.is_contiguous()
    tol = gpu_tolerance(dtype, gpu_backend)
    before = [x.clone() for x in (z, p)]

    got = rk.transported_cosine_loss(z, p, t, backend=gpu_backend)
    assert got.dtype == torch.float32 and got.shape == (b,) and got.device == z.device
    torch.testing.assert_close(got.cpu(), _ref_transported(z, p, t), **tol)

    tc = t.to("cpu")
    y = rk.transport(p, t, backend=gpu_backend)
    assert y.dtype == torch.float32 and y.shape == (b, d) and y.device.type == DEVICE
    want_y = reference.transport(p.cpu(), tc.mean, tc.matrix, tc.bias)
    torch.testing.assert_close(y.cpu(), want_y, **tol)

    target = strided((b, d), dtype, generator, layout, DEVICE)
    target[-1] = 0  # a zero-norm target row
    torch.testing.assert_close(
        rk.cosine_loss(z, target, backend=gpu_backend).cpu(),
        reference.cosine_loss(*on_cpu(z, target)),
        **gpu_tolerance(torch.float32, "cuda"),  # no GEMM: float32 math on the same values
    )
    assert all(torch.equal(x, y) for x, y in zip((z, p), before, strict=True))


def _assert_rows_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Entries agree to ``rtol`` of their row's largest entry (float16's subnormal spacing as the
    absolute floor)."""
    got64, want64 = got.double(), want.double()
    scale = want64.abs().amax(dim=1, keepdim=True)
    excess = (got64 - want64).abs() - rtol * scale - 4 * 2.0**-24
    worst = int(excess.amax(dim=1).argmax())
    assert excess.max().item() <= 0, (
        f"row {worst}: got {got64[worst].tolist()[:8]}, want {want64[worst].tolist()[:8]}"
    )


def _grads(fn, z, upstream):
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    (grad,) = torch.autograd.grad(out, z, upstream)
    return out.detach().cpu(), grad.cpu()


@pytest.mark.parametrize(
    "reduction,weighted", [("none", False), ("none", True), ("sum", True), ("mean", False)]
)
@pytest.mark.parametrize("b,d,dp", [(1, 7, 5), (257, 33, 40), (65, 300, 384)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference(gpu_backend, dtype, b, d, dp, reduction, weighted, generator):
    # float16: the zero row's clamped-norm gradient (~1e8) overflows; see test_loss_ops.
    z, p, t = make_loss_inputs(
        b, d, dp, dtype, generator, "sliced", zero_rows=dtype != torch.float16, device=DEVICE
    )
    # Weights and upstream gradients of magnitude 0.5..1.5: tiny products would make 16-bit
    # gradients subnormal, a rounding regime tests/test_loss_ops.py covers on CPU.
    weight = (torch.rand(b, generator=generator) + 0.5).to(DEVICE) if weighted else None
    sign = torch.randint(0, 2, (b,), generator=generator) * 2 - 1
    upstream = (
        sign * (torch.rand(b, generator=generator) + 0.5)
        if reduction == "none"
        else torch.tensor(0.7)
    )
    zc, pc = on_cpu(z, p)
    tc = t.to("cpu")
    wc = None if weight is None else weight.cpu()

    got, got_grad = _grads(
        lambda z_: rk.transported_cosine_loss(
            z_, p, t, weight=weight, reduction=reduction, backend=gpu_backend
        ),
        z,
        upstream.to(DEVICE),
    )
    want, want_grad = _grads(
        lambda z_: reference.reduce_loss(
            reference.transported_cosine_loss(z_, pc, tc.mean, tc.matrix, tc.bias), wc, reduction
        ),
        zc,
        upstream,
    )
    torch.testing.assert_close(got, want, **gpu_tolerance(dtype, gpu_backend))
    assert got_grad.dtype == dtype and got_grad.shape == z.shape
    if gpu_backend == "cuda" or dtype == torch.float32:
        assert_grad_close(got_grad, want_grad)
    else:
        # Triton's 16-bit GEMM gives targets rounded differently from the reference's, so the
        # gradient is compared against the reference evaluated on the kernel's own targets.
        y = rk.transport(p, t, backend=gpu_backend).cpu()
        _, own_grad = _grads(
            lambda z_: reference.reduce_loss(reference.cosine_loss(z_, y), wc, reduction),
            zc,
            upstream,
        )
        _assert_rows_close(got_grad, own_grad, 2e-2)
    if dtype != torch.float16:
        assert torch.isfinite(got_grad.float()).all()

    target = reference.transport(pc, tc.mean, tc.matrix, tc.bias).to(dtype)
    got, got_grad = _grads(
        lambda z_: rk.cosine_loss(
            z_, target.to(DEVICE), weight=weight, reduction=reduction, backend=gpu_backend
        ),
        z,
        upstream.to(DEVICE),
    )
    want, want_grad = _grads(
        lambda z_: reference.reduce_loss(reference.cosine_loss(z_, target), wc, reduction),
        zc,
        upstream,
    )
    torch.testing.assert_close(got, want, **gpu_tolerance(torch.float32, "cuda"))
    assert_grad_close(got_grad, want_grad)


def test_no_grad_path_and_backward_twice(gpu_backend, generator):
    z, p, t = make_loss_inputs(9, 12, 20, torch.float32, generator, zero_rows=False, device=DEVICE)
    with torch.no_grad():
        a = rk.transported_cosine_loss(z.clone().requires_grad_(True), p, t, backend=gpu_backend)
    assert a.grad_fn is None
    torch.testing.assert_close(a, rk.transported_cosine_loss(z, p, t, backend=gpu_backend))
    zg = z.clone().requires_grad_(True)
    loss = rk.transported_cosine_loss(zg, p, t, reduction="sum", backend=gpu_backend)
    (g1,) = torch.autograd.grad(loss, zg, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, zg)
    torch.testing.assert_close(g1, g2)


def test_opcheck_on_cuda(gpu_backend, generator):
    prefix = "triton_" if gpu_backend == "triton" else ""
    ops = torch.ops.rela
    for compute_grad in (True, False):
        z, p, t = make_loss_inputs(
            5, 6, 7, torch.float32, generator, zero_rows=False, device=DEVICE
        )
        z.requires_grad_(compute_grad)
        y = reference.transport(p, t.mean, t.matrix, t.bias)
        torch.library.opcheck(
            getattr(ops, f"{prefix}transported_cosine_loss_fwd").default,
            (z, p, t.mean, t.matrix, t.bias, 1e-8, compute_grad),
        )
        torch.library.opcheck(
            getattr(ops, f"{prefix}cosine_loss_fwd").default, (z, y, 1e-8, compute_grad)
        )
        torch.library.opcheck(
            getattr(ops, f"{prefix}transport").default, (p, t.mean, t.matrix, None)
        )
    if gpu_backend == "cuda":
        scores = make_scores("duplicates", 20_000, torch.float32, generator).to(DEVICE)
        torch.library.opcheck(ops.select_topk.default, (scores, 300, True))
        torch.library.opcheck(
            ops.score_and_select.default, (z.detach(), p, t.mean, t.matrix, t.bias, 1e-8, 4, False)
        )


def test_torch_compile_fullgraph_on_cuda(gpu_backend, generator):
    z, p, t = make_loss_inputs(
        64, 32, 48, torch.bfloat16, generator, zero_rows=False, device=DEVICE
    )
    weight = torch.rand(64, generator=generator).to(DEVICE)

    def step(z_, p_, w_):
        loss = rk.transported_cosine_loss(
            z_, p_, t, weight=w_, reduction="mean", backend=gpu_backend
        )
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=True)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    eager = step(z1, p, weight)
    eager.backward()
    got = compiled(z2, p, weight)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(z2.grad, z1.grad)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


def _check_select(backend, scores, k, largest):
    before = scores.clone()
    got = rk.select_topk(scores, k, largest=largest, backend=backend)
    assert got.dtype == torch.int64 and got.shape == (k,) and got.device == scores.device
    want = reference.select_topk(scores.cpu(), k, largest)
    assert torch.equal(got.cpu(), want), (backend, scores.dtype, scores.shape, k, largest)
    assert torch.equal(scores, before)


# Both sides of the kernels' size thresholds (one block, the radix select, several chunks).
SELECT_SIZES = (1, 2, 17, 1000, 16_385, 150_001)
LARGE_KINDS = ("randn", "narrow")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_matches_reference(gpu_backend, kind, dtype, generator):
    sizes = SELECT_SIZES + ((600_001,) if kind in LARGE_KINDS else ())
    for n in sizes:
        scores = make_scores(kind, n, dtype, generator)
        on_device = scores.to(DEVICE)
        for largest in (True, False):
            # The reference's stable order once per score set; its prefixes are every k's answer.
            order = torch.sort(scores.float(), descending=largest, stable=True).indices
            for k in k_values(n, generator):
                got = rk.select_topk(on_device, k, largest=largest, backend=gpu_backend)
                assert got.dtype == torch.int64 and got.shape == (k,) and got.device.type == DEVICE
                assert torch.equal(got.cpu(), torch.sort(order[:k]).values), (n, k, largest)


@pytest.mark.parametrize("n", (5, 1000, 40_000))
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_non_contiguous(gpu_backend, n, dtype, generator):
    base = make_scores("duplicates", 3 * n, dtype, generator).to(DEVICE)
    views = {"strided": base[::3], "column": base.view(n, 3)[:, 1], "expanded": base[:1].expand(n)}
    for name, scores in views.items():
        assert not scores.is_contiguous(), name
        for k in (1, n // 3, n - 1):
            for largest in (True, False):
                _check_select(gpu_backend, scores, k, largest)


def test_select_topk_degenerate(gpu_backend):
    empty = torch.empty(0, device=DEVICE)
    assert rk.select_topk(empty, 0, backend=gpu_backend).tolist() == []
    x = torch.tensor([1.0, 3.0, 3.0, -0.0, 0.0, float("inf"), float("-inf"), 3.0], device=DEVICE)
    assert rk.select_topk(x, 3, backend=gpu_backend).tolist() == [1, 2, 5]
    assert rk.select_topk(x, 2, largest=False, backend=gpu_backend).tolist() == [3, 6]
    assert rk.select_topk(x, 8, backend=gpu_backend).tolist() == list(range(8))
    assert rk.select_topk(x, 0, backend=gpu_backend).tolist() == []
    for dtype in DTYPES:
        info = torch.finfo(dtype)
        values = [0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny, info.smallest_normal / 4]
        values += [float("inf"), float("-inf"), 1.0, -1.0]
        scores = torch.tensor(values).to(dtype).to(DEVICE)
        for k in range(len(values) + 1):
            for largest in (True, False):
                _check_select(gpu_backend, scores, k, largest)


@pytest.mark.parametrize("n", (10, 40_000))
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_rejects_nan(gpu_backend, n, dtype, generator):
    int_dtype, patterns = NAN_BITS[dtype]
    for pattern in patterns:
        scores = torch.randn(n, generator=generator).to(dtype).to(DEVICE)
        scores.view(int_dtype)[n // 2] = pattern
        before = scores.clone()
        for k in (0, 1, n):
            with pytest.raises(ValueError, match="scores must not contain NaN, got 1"):
                rk.select_topk(scores, k, backend=gpu_backend)
        assert torch.equal(scores.view(int_dtype), before.view(int_dtype))


@pytest.mark.parametrize("layout", ("contiguous", "transposed"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", (1, 301, 20_000))
def test_score_and_select(gpu_backend, dtype, layout, b, generator):
    d, dp = 24, 40
    z, p, t = make_loss_inputs(b, d, dp, dtype, generator, layout, zero_rows=False, device=DEVICE)
    if b > 5:
        z[5] = z[4]  # equal rows: equal losses, a tie the lower index must win
        p[5] = p[4]
    want_losses = _ref_transported(z, p, t)
    before = [x.clone() for x in (z, p)]
    for k in sorted({0, 1, b // 3, b - 1, b}):
        for largest in (True, False):
            indices, losses = rk.score_and_select(z, p, t, k, largest=largest, backend=gpu_backend)
            assert (
                indices.dtype == torch.int64
                and indices.shape == (k,)
                and indices.device.type == DEVICE
            )
            assert (
                losses.dtype == torch.float32
                and losses.shape == (b,)
                and losses.device.type == DEVICE
            )
            torch.testing.assert_close(
                losses.cpu(), want_losses, **gpu_tolerance(dtype, gpu_backend)
            )
            # The selection is exactly select_topk of the losses the op returned.
            assert torch.equal(indices.cpu(), reference.select_topk(losses.cpu(), k, largest))
    assert all(torch.equal(x, y) for x, y in zip((z, p), before, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_streaming_topk_and_select_in_batch(dtype, generator):
    n = 30_001
    scores = torch.randint(-3, 4, (n,), generator=generator).to(dtype)
    scores[torch.rand(n, generator=generator) < 0.05] = float("inf")
    on_device = scores.to(DEVICE)
    cuts = sorted({0, n, *torch.randint(0, n + 1, (6,), generator=generator).tolist()})
    pieces = list(zip(cuts[:-1], cuts[1:], strict=True))[::-1]  # out of order
    for k in (0, 1, 17, n // 2, n):
        for largest in (True, False):
            stream = rk.StreamingTopK(k, largest=largest)
            for start, end in pieces:
                stream.update(on_device[start:end], start)
            indices, values = stream.result()
            want = reference.select_topk(scores, k, largest)
            if k:
                assert indices.device.type == DEVICE and values.device.type == DEVICE
            assert torch.equal(indices.cpu(), want)
            assert torch.equal(values.cpu(), scores[want].float())
            got = rk.select_in_batch(on_device, k, largest=largest)
            assert got.device.type == DEVICE and torch.equal(got.cpu(), want)
    half = rk.select_in_batch(on_device, 0.5)
    assert torch.equal(half.cpu(), reference.select_topk(scores, n // 2, True))


# ---------------------------------------------------------------------------------------------
# Transport fitting on CUDA inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_fits_on_cuda_inputs(dtype, generator):
    x = anisotropic(generator, 20_000, 37, offset=10.0, spread=2.0).to(dtype)
    t = rk.fit_pca_whitening(x.to(DEVICE), 11)
    assert t.device.type == "cpu"
    mean, matrix = numpy_whitening(x.double().numpy(), 11)
    np.testing.assert_allclose(t.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t.matrix.numpy(), matrix, rtol=1e-4, atol=1e-6)
    on_cpu_fit = rk.fit_pca_whitening(x, 11, device=DEVICE)  # CPU rows, CUDA accumulation
    torch.testing.assert_close(on_cpu_fit.matrix, t.matrix, rtol=1e-5, atol=1e-7)

    w = torch.randn(37, 5, generator=generator, dtype=torch.float64)
    b = torch.randn(5, generator=generator, dtype=torch.float64)
    y = (x.double() @ w + b).to(dtype)
    ls = rk.fit_least_squares(x.to(DEVICE), y.to(DEVICE))
    assert ls.device.type == "cpu"
    want = rk.fit_least_squares(x, y)  # the CPU fit: float64 statistics either way
    torch.testing.assert_close(ls.matrix, want.matrix, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ls.bias, want.bias, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input on CUDA: a one-line error naming the argument (and both devices), nothing modified
# ---------------------------------------------------------------------------------------------


def test_mixed_devices_name_both(gpu_backend, generator):
    z, p, t = make_loss_inputs(4, 3, 5, torch.float32, generator, zero_rows=False, device=DEVICE)
    cpu_z, cpu_p = on_cpu(z, p)
    before = [x.clone() for x in (z, p)]
    cases = [
        (lambda: rk.transported_cosine_loss(cpu_z, p, t, backend=gpu_backend), "z", "p"),
        (lambda: rk.transported_cosine_loss(z, cpu_p, t, backend=gpu_backend), "z", "p"),
        (lambda: rk.transported_cosine_loss(z, p, t.to("cpu"), backend=gpu_backend), "t", ""),
        (lambda: rk.transport(p, t.to("cpu"), backend=gpu_backend), "t", ""),
        (lambda: rk.score_and_select(z, cpu_p, t, 2, backend=gpu_backend), "z", "p"),
        (lambda: rk.cosine_loss(z, cpu_z, backend=gpu_backend), "z", "y"),
        (
            lambda: rk.transported_cosine_loss(z, p, t, weight=torch.ones(4), backend=gpu_backend),
            "weight",
            "",
        ),
    ]
    for call, first, second in cases:
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message
        assert "cpu" in message and "cuda:0" in message, message
        assert f"{first} is on" in message, message
        if second:
            assert f"{second} is on" in message, message
    assert all(torch.equal(x, y) for x, y in zip((z, p), before, strict=True))

    stream = rk.StreamingTopK(3)
    stream.update(torch.randn(10, generator=generator).to(DEVICE))
    with pytest.raises(ValueError, match="scores is on cpu but earlier chunks were on cuda:0"):
        stream.update(torch.randn(10, generator=generator), 10)
    with pytest.raises(ValueError, match="src is on cpu but dst is on cuda:0"):
        rk.fit_least_squares(torch.randn(8, 3), torch.randn(8, 2, device=DEVICE))
    with pytest.raises(ValueError, match="chunk 1 is on cpu but chunk 0 is on cuda:0"):
        rk.fit_pca_whitening([torch.randn(8, 3, device=DEVICE), torch.randn(8, 3)], 2)


def test_bad_values_on_cuda(gpu_backend, generator):
    z, p, t = make_loss_inputs(6, 4, 5, torch.float32, generator, zero_rows=False, device=DEVICE)
    bad = p.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="p must be finite, got 1 non-finite"):
        rk.transported_cosine_loss(z, bad, t, backend=gpu_backend)
    with pytest.raises(ValueError, match="p must be finite"):
        rk.score_and_select(z, bad, t, 2, backend=gpu_backend)
    inf_z = z.clone()
    inf_z[0, 0] = float("inf")
    with pytest.raises(ValueError, match="z must be finite"):
        rk.cosine_loss(inf_z, z, backend=gpu_backend)
    with pytest.raises(ValueError, match="at least one row"):
        rk.transported_cosine_loss(z[:0], p[:0], t, backend=gpu_backend)
    with pytest.raises(ValueError, match=r"k must be in \[0, 6\]"):
        rk.score_and_select(z, p, t, 7, backend=gpu_backend)
    with pytest.raises(TypeError, match="z must have dtype"):
        rk.transported_cosine_loss(z.double(), p, t, backend=gpu_backend)
    with pytest.raises(ValueError, match="p must have 6 columns"):
        rk.transported_cosine_loss(z, p, make_transport(6, 4, generator, device=DEVICE))
    with pytest.raises(TypeError, match="scores must have dtype"):
        rk.select_topk(torch.arange(4, device=DEVICE), 1, backend=gpu_backend)
