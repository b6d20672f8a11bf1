"""Triton kernels of rela_kernels.triton.cosine_loss against rela_kernels.reference.

On a machine without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest.py
sets the flag before triton is first imported, and only there). With a GPU the same tests run on
CUDA tensors with the compiled kernels, and are then marked ``cuda`` so that ``pytest -m cuda``
(``make gpu-check``) runs them too.

Every test draws fresh random inputs (a freshly seeded generator; the seed is in the failure
message), so nothing here compares against stored numbers.
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from rela_kernels import reference  # noqa: E402
from rela_kernels.triton import cosine_loss as kernels  # noqa: E402

if kernels.is_interpreted():
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:  # pragma: no cover - triton imported before TRITON_INTERPRET was set, and no GPU
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = [pytest.mark.cuda] if DEVICE.type == "cuda" else []

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS = 1e-8


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.seed()
    return g


def _tol(*dtypes: torch.dtype) -> float:
    """1e-5 when everything is float32, 1e-2 as soon as a 16-bit tensor is involved."""
    return 1e-5 if all(d == F32 for d in dtypes) else 1e-2


def _randn(shape: tuple[int, ...], g: torch.Generator, scale: float = 1.0, shift: float = 0.0):
    return torch.randn(shape, generator=g) * scale + shift


def _matrix_input(
    rows: int, cols: int, dtype: torch.dtype, layout: str, g: torch.Generator, shift: float = 0.0
) -> torch.Tensor:
    """A [rows, cols] input on DEVICE: contiguous, a strided slice, or transposed storage."""
    if layout == "contig":
        return _randn((rows, cols), g, shift=shift).to(DEVICE, dtype)
    if layout == "slice":
        # Every other column of a wider tensor, with an offset: strides (2 * cols + 3, 2).
        wide = _randn((rows, 2 * cols + 3), g, shift=shift).to(DEVICE, dtype)
        return wide[:, 1 : 2 * cols + 1 : 2]
    if layout == "transposed":
        return _randn((cols, rows), g, shift=shift).to(DEVICE, dtype).t()
    raise ValueError(layout)


def _transport_params(dp: int, d: int, with_bias: bool, g: torch.Generator):
    mean = _randn((dp,), g, shift=1.0).to(DEVICE)
    matrix = (_randn((dp, d), g) / dp**0.5).to(DEVICE)
    bias = _randn((d,), g, scale=0.1).to(DEVICE) if with_bias else None
    return mean, matrix, bias


def _snapshot(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.clone() for t in tensors]


def _assert_unmodified(before, *tensors: torch.Tensor | None, msg: str) -> None:
    for old, new in zip(before, tensors, strict=True):
        if new is not None:
            assert torch.equal(old, new), f"an input was modified ({msg})"


def _assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tol: float,
    msg: str,
    scale: torch.Tensor | None = None,
) -> None:
    """|a - e| <= tol * (|e| + scale); infinities must match exactly.

    ``scale`` defaults to the largest finite |e| (per row for 2-D tensors).
    """
    assert actual.shape == expected.shape, msg
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert not torch.isnan(a).any() and not torch.isnan(e).any(), f"NaN ({msg})"
    inf = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf), f"infinities differ ({msg})"
    assert torch.equal(a[inf], e[inf]), f"infinities differ in sign ({msg})"
    a, e = a.masked_fill(inf, 0.0), e.masked_fill(inf, 0.0)
    if scale is None:
        scale = e.abs().amax(dim=1, keepdim=True) if e.dim() == 2 else e.abs().amax()
    bound = tol * (e.abs() + scale.double().cpu())
    excess = (a - e).abs() - bound
    assert (excess <= 0).all(), (
        f"max |diff| {(a - e).abs().max().item():.3g}, worst excess {excess.max().item():.3g} "
        f"at {divmod(int(excess.argmax()), max(e.shape[-1], 1))} ({msg})"
    )


def _reference_loss_and_grad(loss_fn, z: torch.Tensor):
    """Reference loss [B] and d(sum loss)/dz in z's dtype, through ordinary autograd."""
    zr = z.detach().clone().requires_grad_(True)
    loss = loss_fn(zr)
    (grad,) = torch.autograd.grad(loss.sum(), zr)
    return loss.detach(), grad


def _check_outputs(loss, grad, z, ref_loss, ref_grad, compute_grad, tol, msg) -> None:
    assert loss.dtype == F32 and loss.shape == (z.shape[0],) and loss.device == z.device, msg
    # loss = 1 - cos lies in [0, 2]; its rounding error is absolute (atol = tol), so a loss
    # of 0 (z parallel to y, e.g. d = 1) is no harder than any other.
    _assert_close(loss, ref_loss, tol, f"loss, {msg}", scale=torch.tensor(1.0))
    if not compute_grad:
        assert grad.numel() == 0 and grad.dtype == z.dtype and grad.device == z.device, msg
        return
    assert grad.dtype == z.dtype and grad.shape == z.shape and grad.device == z.device, msg
    assert grad.is_contiguous(), msg
    # The gradient is the difference of two terms, each at most 1 / max(|z|, eps) per element,
    # that cancel where z is parallel to y (always for d = 1): errors scale with the terms, not
    # with the result. For float32 that cancellation costs a little more than the loss does.
    term_scale = 1.0 / z.double().norm(dim=1, keepdim=True).clamp_min(EPS)
    _assert_close(grad, ref_grad, tol if tol > 1e-5 else 1e-4, f"grad, {msg}", term_scale)


# ------------------------------------------------------------------------------------------
# Cases: every (B, d, Dp) of the grid below; dtypes, layouts, bias and compute_grad are cycled
# through with different periods so that the combinations mix. d = 257 exceeds one register
# tile (the two-pass path); Dp = 384 takes several K steps, Dp = 5 one masked step.
# ------------------------------------------------------------------------------------------

BATCHES = (1, 3, 17, 33)
WIDTHS = (1, 7, 64, 257)
PRIOR_WIDTHS = (5, 384)
SHAPES = list(itertools.product(BATCHES, WIDTHS, PRIOR_WIDTHS))  # (B, d, Dp)
DTYPES = (F32, F16, BF16)
DTYPE_PAIRS = ((F32, F32), (F16, F16), (BF16, BF16), (F32, BF16), (BF16, F32), (F16, F32))
LAYOUTS = ("contig", "slice", "transposed")
LAYOUT_PAIRS = (
    ("slice", "transposed"),
    ("contig", "contig"),
    ("transposed", "slice"),
    ("slice", "slice"),
    ("contig", "transposed"),
)


def _cycle(values, n: int):
    return values[n % len(values)]


def _with_bias(n: int) -> bool:
    return (n // 2) % 2 == 0  # period 4: every dtype pair meets both values


def _with_grad(n: int) -> bool:
    return n % 7 not in (3, 6)  # period 7, co-prime to the dtype and layout cycles


# ------------------------------------------------------------------------------------------
# transport
# ------------------------------------------------------------------------------------------

TRANSPORT_CASES = [
    # B, Dp, d, p dtype, p layout, bias: every shape, the other axes cycled through
    (b, dp, d, _cycle(DTYPES, n), _cycle(LAYOUTS, n), _with_bias(n))
    for n, (b, d, dp) in enumerate(SHAPES)
]


@pytest.mark.parametrize("batch, dp, d, dtype, layout, with_bias", TRANSPORT_CASES)
def test_transport_matches_reference(gen, batch, dp, d, dtype, layout, with_bias):
    msg = f"seed={gen.initial_seed()}"
    p = _matrix_input(batch, dp, dtype, layout, gen, shift=1.0)
    mean, matrix, bias = _transport_params(dp, d, with_bias, gen)
    before = _snapshot(p, mean, matrix, bias)

    y = kernels.transport(p, mean, matrix, bias)

    expected = reference.transport(p, mean, matrix, bias)
    assert y.dtype == F32 and y.shape == (batch, d) and y.is_contiguous(), msg
    # A dot product's rounding error scales with the sum of its terms' magnitudes, not with
    # its (possibly cancelled) value.
    magnitude = (p.float() - mean).abs() @ matrix.abs()
    if bias is not None:
        magnitude += bias.abs()
    _assert_close(y, expected, _tol(dtype), msg, scale=magnitude)
    _assert_unmodified(before, p, mean, matrix, bias, msg=msg)


# ------------------------------------------------------------------------------------------
# cosine_loss_fwd
# ------------------------------------------------------------------------------------------

COSINE_CASES = [
    # B, d, z dtype, y dtype, z layout, y layout, compute_grad
    (b, d, *_cycle(DTYPE_PAIRS, n), *_cycle(LAYOUT_PAIRS, n), _with_grad(n))
    for n, (b, d) in enumerate(itertools.product(BATCHES, WIDTHS))
]


@pytest.mark.parametrize(
    "batch, d, z_dtype, y_dtype, z_layout, y_layout, compute_grad", COSINE_CASES
)
def test_cosine_loss_fwd_matches_reference(
    gen, batch, d, z_dtype, y_dtype, z_layout, y_layout, compute_grad
):
    msg = f"seed={gen.initial_seed()}"
    z = _matrix_input(batch, d, z_dtype, z_layout, gen)
    y = _matrix_input(batch, d, y_dtype, y_layout, gen)
    before = _snapshot(z, y)

    loss, grad = kernels.cosine_loss_fwd(z, y, EPS, compute_grad)

    ref_loss, ref_grad = _reference_loss_and_grad(lambda zr: reference.cosine_loss(zr, y, EPS), z)
    _check_outputs(loss, grad, z, ref_loss, ref_grad, compute_grad, _tol(z_dtype, y_dtype), msg)
    _assert_unmodified(before, z, y, msg=msg)


# ------------------------------------------------------------------------------------------
# transported_cosine_loss_fwd
# ------------------------------------------------------------------------------------------

FUSED_CASES = [
    # B, d, Dp, z dtype, p dtype, z layout, p layout, bias, compute_grad
    (b, d, dp, *_cycle(DTYPE_PAIRS, n), *_cycle(LAYOUT_PAIRS, n), _with_bias(n), _with_grad(n))
    for n, (b, d, dp) in enumerate(SHAPES)
]


@pytest.mark.parametrize(
    "batch, d, dp, z_dtype, p_dtype, z_layout, p_layout, with_bias, compute_grad", FUSED_CASES
)
def test_transported_cosine_loss_fwd_matches_reference(
    gen, batch, d, dp, z_dtype, p_dtype, z_layout, p_layout, with_bias, compute_grad
):
    msg = f"seed={gen.initial_seed()}"
    z = _matrix_input(batch, d, z_dtype, z_layout, gen)
    p = _matrix_input(batch, dp, p_dtype, p_layout, gen, shift=1.0)
    mean, matrix, bias = _transport_params(dp, d, with_bias, gen)
    before = _snapshot(z, p, mean, matrix, bias)

    loss, grad = kernels.transported_cosine_loss_fwd(z, p, mean, matrix, bias, EPS, compute_grad)

    ref_loss, ref_grad = _reference_loss_and_grad(
        lambda zr: reference.transported_cosine_loss(zr, p, mean, matrix, bias, EPS), z
    )
    _check_outputs(loss, grad, z, ref_loss, ref_grad, compute_grad, _tol(z_dtype, p_dtype), msg)
    _assert_unmodified(before, z, p, mean, matrix, bias, msg=msg)


# ------------------------------------------------------------------------------------------
# Zero-norm rows and the eps clamp
# ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 inf
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("d", [7, 257])
def test_zero_norm_rows(gen, dtype, d):
    """Rows of z or y that are exactly zero: loss 1, and torch's gradient at the clamp."""
    msg = f"seed={gen.initial_seed()}"
    batch, dp = 17, 5
    z = _matrix_input(batch, d, dtype, "slice", gen)
    p = _matrix_input(batch, dp, dtype, "contig", gen, shift=1.0)
    _, matrix, _ = _transport_params(dp, d, False, gen)
    z[2] = 0  # zero z row (written through the strided view)
    z[5] = 0  # zero z and zero y row
    # p row 5 (and row 9) equal to the mean: their transported target is exactly zero.
    mean = p[5].float()
    p[9] = p[5]
    y = reference.transport(p, mean, matrix)
    assert torch.count_nonzero(y[5]) == 0 and torch.count_nonzero(y[9]) == 0
    before = _snapshot(z, p, mean, matrix, y)
    tol = _tol(dtype)

    for name, run, ref_fn in [
        (
            "fused",
            lambda: kernels.transported_cosine_loss_fwd(z, p, mean, matrix, None, EPS, True),
            lambda zr: reference.transported_cosine_loss(zr, p, mean, matrix, None, EPS),
        ),
        (
            "plain",
            lambda: kernels.cosine_loss_fwd(z, y, EPS, True),
            lambda zr: reference.cosine_loss(zr, y, EPS),
        ),
    ]:
        loss, grad = run()
        ref_loss, ref_grad = _reference_loss_and_grad(ref_fn, z)
        _check_outputs(loss, grad, z, ref_loss, ref_grad, True, tol, f"{name}, {msg}")
        for row in (2, 5, 9):
            assert loss[row].item() == 1.0, f"{name} row {row} ({msg})"
        assert torch.count_nonzero(grad[5]) == 0 and torch.count_nonzero(grad[9]) == 0, name
    _assert_unmodified(before, z, p, mean, matrix, y, msg=msg)


def test_eps_clamps_small_norms(gen):
    """A large eps clamps both norms; the clamp has no gradient, so the z term drops."""
    msg = f"seed={gen.initial_seed()}"
    batch, d, dp = 17, 7, 5
    eps = 3.0
    z = _randn((batch, d), gen).to(DEVICE)
    z[::2] *= 0.1  # every other row below eps, the rest mostly above
    p = _randn((batch, dp), gen, shift=1.0).to(DEVICE)
    mean, matrix, bias = _transport_params(dp, d, True, gen)
    y = reference.transport(p, mean, matrix, bias)

    loss, grad = kernels.transported_cosine_loss_fwd(z, p, mean, matrix, bias, eps, True)
    ref = _reference_loss_and_grad(
        lambda zr: reference.transported_cosine_loss(zr, p, mean, matrix, bias, eps), z
    )
    _check_outputs(loss, grad, z, *ref, True, 1e-5, f"fused, {msg}")

    loss, grad = kernels.cosine_loss_fwd(z, y, eps, True)
    ref = _reference_loss_and_grad(lambda zr: reference.cosine_loss(zr, y, eps), z)
    _check_outputs(loss, grad, z, *ref, True, 1e-5, f"plain, {msg}")


# ------------------------------------------------------------------------------------------
# Edge cases and internals
# ------------------------------------------------------------------------------------------


def test_empty_batch():
    z = torch.empty(0, 7, device=DEVICE)
    p = torch.empty(0, 5, device=DEVICE)
    mean, matrix = torch.zeros(5, device=DEVICE), torch.zeros(5, 7, device=DEVICE)
    assert kernels.transport(p, mean, matrix, None).shape == (0, 7)
    for loss, grad in (
        kernels.cosine_loss_fwd(z, z, EPS, True),
        kernels.transported_cosine_loss_fwd(z, p, mean, matrix, None, EPS, True),
    ):
        assert loss.shape == (0,) and loss.dtype == F32 and grad.shape == (0, 7)


def test_dot_matrix_cache_follows_in_place_updates(gen):
    """The cached 16-bit matrix copy is reused, and refreshed after an in-place update."""
    matrix = _randn((5, 7), gen).to(DEVICE)
    assert kernels._dot_matrix(matrix, BF16, lowp=False) is matrix
    first = kernels._dot_matrix(matrix, BF16, lowp=True)
    assert first.dtype == BF16 and torch.equal(first, matrix.to(BF16))
    assert kernels._dot_matrix(matrix, BF16, lowp=True) is first
    matrix.mul_(2)
    second = kernels._dot_matrix(matrix, BF16, lowp=True)
    assert torch.equal(second, matrix.to(BF16))
    assert kernels._dot_matrix(matrix, F16, lowp=True).dtype == F16
    other = matrix.clone()
    assert kernels._dot_matrix(other, F16, lowp=True) is not kernels._dot_matrix(
        matrix, F16, lowp=True
    )


# ------------------------------------------------------------------------------------------
# Every tile of the fused kernel's autotuning list, forced (the GPU autotuner may pick any of
# them; the Hopper-shaped 64- and 128-row tiles are only reachable there)
# ------------------------------------------------------------------------------------------

FUSED_TILES = sorted({(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"]) for c in kernels.fused_configs()})


def _fused_config(block_b: int, block_k: int):
    return next(
        c
        for c in kernels.fused_configs()
        if (c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"]) == (block_b, block_k)
    )


@pytest.mark.parametrize("block_b, block_k", FUSED_TILES)
@pytest.mark.parametrize(
    "d, dtype, with_bias, compute_grad",
    [(200, BF16, True, True), (257, F32, False, True), (33, F16, True, False)],
)
def test_fused_loss_every_tile_matches_reference(
    gen, block_b, block_k, d, dtype, with_bias, compute_grad
):
    """Two programs (the second one partial) and several K steps, the last one masked."""
    msg = f"tile {block_b}x{block_k}, seed={gen.initial_seed()}"
    batch, dp = block_b + 3, 2 * block_k + 5
    z = _matrix_input(batch, d, dtype, "slice", gen)
    p = _matrix_input(batch, dp, dtype, "contig", gen, shift=1.0)
    mean, matrix, bias = _transport_params(dp, d, with_bias, gen)
    config = _fused_config(block_b, block_k)

    loss, grad = kernels.transported_cosine_loss_fwd(
        z, p, mean, matrix, bias, EPS, compute_grad, config=config
    )

    ref_loss, ref_grad = _reference_loss_and_grad(
        lambda zr: reference.transported_cosine_loss(zr, p, mean, matrix, bias, EPS), z
    )
    _check_outputs(loss, grad, z, ref_loss, ref_grad, compute_grad, _tol(dtype), msg)


@pytest.mark.parametrize("block_b, block_k", FUSED_TILES)
@pytest.mark.parametrize("largest", [True, False])
def test_fused_histogram_every_tile_counts_every_row(gen, block_b, block_k, largest):
    """The histogram of each tile holds each row's loss key once, in the right bin."""
    from rela_kernels.triton import score_select

    msg = f"tile {block_b}x{block_k}, seed={gen.initial_seed()}"
    batch, d, dp = 2 * block_b + 1, 24, block_k + 7
    z = _matrix_input(batch, d, F32, "contig", gen)
    p = _matrix_input(batch, dp, F32, "contig", gen, shift=1.0)
    mean, matrix, bias = _transport_params(dp, d, True, gen)

    loss, hist = kernels.transported_cosine_loss_hist(
        z, p, mean, matrix, bias, EPS, largest, config=_fused_config(block_b, block_k)
    )

    ref_loss = reference.transported_cosine_loss(z, p, mean, matrix, bias, EPS)
    _assert_close(loss, ref_loss, 1e-5, msg, scale=torch.tensor(1.0))
    digits = score_select.order_keys(loss, largest) >> (32 - kernels.HIST_BITS)
    expected = torch.bincount(digits, minlength=2**kernels.HIST_BITS).to(torch.int32)
    assert torch.equal(hist.cpu(), expected.cpu()), msg
