"""The Triton score_and_select (rela_kernels.triton.score_select): the fused loss kernel's
histogram of the loss keys and the exact finish on the losses, against rela_kernels.reference.

Run on CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 where
no CUDA device exists), so shapes are small. The key mapping and the histogram are checked against
an independent numpy definition; the selections against ``reference.select_topk``. Inputs are
freshly random. On a CUDA machine the module is skipped: tests/test_cuda_ops.py runs the compiled
kernels there, and setting the flag here would turn every Triton kernel compiled later in the
process (torch.compile's too), and every child process, into interpreted ones.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import rela_kernels as rk  # noqa: E402
from rela_kernels import reference  # noqa: E402
from rela_kernels.triton import cosine_loss as kernels  # noqa: E402
from rela_kernels.triton import score_select  # noqa: E402

if not kernels.is_interpreted():  # pragma: no cover - only with TRITON_INTERPRET=0
    pytest.skip("these tests run the Triton interpreter on CPU tensors", allow_module_level=True)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS = 1e-8


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.seed()
    return g


def numpy_keys(scores: torch.Tensor, largest: bool) -> np.ndarray:
    """Independent order keys: uint64 in [0, 2**32), unsigned order == float order."""
    bits = scores.detach().float().numpy().view(np.uint32).astype(np.uint64)
    bits[bits == 0x80000000] = 0  # -0.0 ties +0.0
    negative = bits >= 0x80000000
    keys = np.where(negative, 0xFFFFFFFF - bits, bits | 0x80000000)
    return keys if largest else 0xFFFFFFFF - keys


def numpy_hist(scores: torch.Tensor, largest: bool, bits: int) -> torch.Tensor:
    digits = numpy_keys(scores, largest) >> np.uint64(32 - bits)
    return torch.from_numpy(np.bincount(digits.astype(np.int64), minlength=2**bits))


def k_values(n: int) -> list[int]:
    return sorted({0, 1, n // 2, n - 1, n} & set(range(n + 1)))


def layout_input(rows: int, cols: int, dtype: torch.dtype, layout: str, g: torch.Generator):
    """[rows, cols] input: contiguous, transposed storage, or every other column of a buffer."""
    if layout == "contiguous":
        return torch.randn(rows, cols, generator=g).to(dtype)
    if layout == "transposed":
        return torch.randn(cols, rows, generator=g).to(dtype).t()
    if layout == "sliced":
        return torch.randn(rows, 2 * cols + 1, generator=g).to(dtype)[:, 1::2]
    raise ValueError(layout)


def make_inputs(b: int, d: int, dp: int, dtype, layout: str, g: torch.Generator, bias=True):
    """z, p and a transport, with three kinds of exact ties among the losses: duplicated rows,
    zero z rows (loss exactly 1) and, without bias, p rows equal to the mean (y = 0, loss 1)."""
    z = layout_input(b, d, dtype, layout, g)
    p = layout_input(b, dp, dtype, layout, g)
    mean = p[0].float() if not bias else torch.randn(dp, generator=g)
    matrix = torch.randn(dp, d, generator=g) / dp**0.5
    t = rk.Transport(mean, matrix, torch.randn(d, generator=g) if bias else None)
    if b >= 8:
        z[3], p[3] = z[2], p[2]  # duplicated row
        z[7], p[7] = z[2], p[2]
        z[4] = 0  # zero prediction
        z[b - 1] = 0
        if not bias:
            p[5] = p[0]  # exactly the mean: zero target
    return z, p, t


# ------------------------------------------------------------------------------------------
# rk.score_and_select on the triton backend
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (F32, F16, BF16))
@pytest.mark.parametrize("layout", ("contiguous", "transposed", "sliced"))
@pytest.mark.parametrize(("b", "d", "dp", "bias"), ((1, 5, 3, True), (37, 8, 13, False)))
def test_score_and_select_matches_reference(gen, dtype, layout, b, d, dp, bias):
    z, p, t = make_inputs(b, d, dp, dtype, layout, gen, bias)
    want_losses = reference.transported_cosine_loss(z, p, t.mean, t.matrix, t.bias)
    plain_losses = rk.transported_cosine_loss(z, p, t, backend="triton")
    inputs = [x.clone() for x in (z, p)]
    tol = 1e-5 if dtype == F32 else 1e-2
    for k in k_values(b):
        for largest in (True, False):
            indices, losses = rk.score_and_select(z, p, t, k, largest=largest, backend="triton")
            assert indices.dtype == torch.int64 and indices.shape == (k,)
            assert losses.dtype == torch.float32 and losses.shape == (b,)
            # The histogram rides along without changing a bit of the losses.
            assert torch.equal(losses, plain_losses)
            torch.testing.assert_close(losses, want_losses, rtol=tol, atol=tol)
            assert torch.equal(indices, reference.select_topk(losses, k, largest)), (k, largest)
    assert all(torch.equal(x, y) for x, y in zip((z, p), inputs, strict=True))


def test_wide_rows_take_the_tiled_kernel_path(gen):
    # d > 256 takes the fused kernel's d-tiled branch, which counts the keys after its loop.
    b, d, dp = 21, 260, 9
    z, p, t = make_inputs(b, d, dp, F32, "contiguous", gen)
    for k in (1, b // 2, b - 1):
        for largest in (True, False):
            indices, losses = rk.score_and_select(z, p, t, k, largest=largest, backend="triton")
            want = reference.transported_cosine_loss(z, p, t.mean, t.matrix, t.bias)
            torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(indices, reference.select_topk(losses, k, largest))


@pytest.mark.parametrize("largest", (True, False))
def test_all_losses_tied_lower_indices_win(gen, largest):
    b = 23
    z, p, t = make_inputs(b, 6, 7, F32, "contiguous", gen)
    z.zero_()  # every loss is exactly 1
    for k in k_values(b):
        indices, losses = rk.score_and_select(z, p, t, k, largest=largest, backend="triton")
        assert torch.equal(losses, torch.ones(b))
        assert torch.equal(indices, torch.arange(k))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("where", ("z", "p"))
@pytest.mark.parametrize("value", (float("inf"), float("-inf"), float("nan")))
def test_non_finite_inputs_raise(gen, where, value):
    b = 19
    z, p, t = make_inputs(b, 6, 7, F32, "contiguous", gen)
    bad = {"z": z, "p": p}[where]
    bad[int(torch.randint(0, b, (1,), generator=gen)), 2] = value
    for k in (1, b // 2):
        with pytest.raises(ValueError, match=f"{where} must be finite"):
            rk.score_and_select(z, p, t, k, backend="triton")


def test_opcheck(gen):
    z, p, t = make_inputs(11, 6, 7, F32, "contiguous", gen)
    for k, largest in ((0, True), (4, False), (11, True)):
        torch.library.opcheck(
            torch.ops.rela.triton_score_and_select.default,
            (z, p, t.mean, t.matrix, t.bias, EPS, k, largest),
        )


# ------------------------------------------------------------------------------------------
# The kernel's histogram
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", (16, 11, 4))
@pytest.mark.parametrize("largest", (True, False))
@pytest.mark.parametrize(("d", "dtype"), ((8, F32), (8, BF16), (8, F16), (260, F32)))
def test_histogram_counts_the_loss_keys(gen, bits, largest, d, dtype):
    b = 29
    z, p, t = make_inputs(b, d, 5, dtype, "transposed", gen, bias=False)
    losses, hist = kernels.transported_cosine_loss_hist(
        z, p, t.mean, t.matrix, t.bias, EPS, largest, bits
    )
    assert hist.dtype == torch.int32 and hist.shape == (2**bits,)
    assert int(hist.sum()) == b
    assert torch.equal(hist.long(), numpy_hist(losses, largest, bits))


# ------------------------------------------------------------------------------------------
# The finish on the losses alone, on scores the loss kernel never produces
# ------------------------------------------------------------------------------------------


def make_scores(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(n, generator=g)
    if kind == "duplicates":
        return torch.randint(0, 5, (n,), generator=g).float() - 2.0
    if kind == "signed_zeros":
        x = torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
        x[torch.rand(n, generator=g) < 0.2] = 1.0
        return x
    if kind == "infinities":
        x = torch.randn(n, generator=g)
        u = torch.rand(n, generator=g)
        x[u < 0.2] = float("inf")
        x[u > 0.8] = float("-inf")
        return x
    if kind == "narrow":  # one 16-bit bin holds nearly everything
        return 1.0 + torch.randn(n, generator=g) * 1e-4
    if kind == "subnormal":
        return torch.randn(n, generator=g) * 1e-40
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ("randn", "duplicates", "signed_zeros", "infinities", "narrow", "subnormal")
)
@pytest.mark.parametrize("n", (1, 2, 3, 17, 1001))
@pytest.mark.parametrize("bits", (16, 8, 1))
def test_select_from_histogram_matches_reference(gen, kind, n, bits):
    scores = make_scores(kind, n, gen)
    for largest in (True, False):
        hist = numpy_hist(scores, largest, bits).to(torch.int32)
        keys = score_select.order_keys(scores, largest).numpy()
        assert np.array_equal(keys, numpy_keys(scores, largest).astype(np.int64))
        for k in k_values(n) + [int(torch.randint(0, n + 1, (1,), generator=gen))]:
            got = score_select.select_from_histogram(scores, hist, k, largest, bits)
            assert torch.equal(got, reference.select_topk(scores, k, largest)), (k, largest)


def test_select_from_histogram_rejects_a_foreign_histogram(gen):
    scores = torch.rand(50, generator=gen) + 1.0  # positive: keys have the top bit set
    hist = torch.zeros(2**16, dtype=torch.int32)
    hist[0] = 50  # as if every key were below -inf's
    with pytest.raises(RuntimeError, match="histogram does not match"):
        score_select.select_from_histogram(scores, hist, 10, True, 16)


@pytest.mark.parametrize("largest", (True, False))
def test_select_from_histogram_orders_nan_by_key(gen, largest):
    # NaN losses only come from non-finite inputs, which rk.score_and_select rejects after the
    # kernel: until then the finish must not fail, and answers in key order (NaN beyond ±inf).
    n = 41
    scores = make_scores("infinities", n, gen)
    scores[torch.rand(n, generator=gen) < 0.2] = float("nan")
    scores[3] = -float("nan")
    keys = numpy_keys(scores, largest)
    hist = numpy_hist(scores, largest, 16).to(torch.int32)
    for k in k_values(n):
        order = np.lexsort((np.arange(n), -keys.astype(np.float64)))  # key desc, then index
        want = torch.from_numpy(np.sort(order[:k]))
        assert torch.equal(score_select.select_from_histogram(scores, hist, k, largest), want)
