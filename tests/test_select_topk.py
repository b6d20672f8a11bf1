"""select_topk and score_and_select: every backend against the reference, the reference against
an independent numpy ordering, on ties, infinities, signed zeros, every dtype and layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import usable_backends
from helpers import DTYPES, make_loss_inputs

import rela_kernels as rk
from rela_kernels import reference

BACKENDS = usable_backends()
# The triton backend has no select kernel of its own (it uses the compiled select of the device,
# see ops._select_on_device), so large inputs are run through the C++ kernel only.
NATIVE = [b for b in BACKENDS if b == "cpu"]
# The C++ kernel switches from a (key, index) selection to the radix select above 2^14 scores;
# the radix select uses one chunk per thread for more than 2^17 scores, and 16-bit instead of
# 11-bit (8-bit for 16-bit dtypes) digits for chunks of 2^18 scores or more: sizes on all sides.
SMALL_SIZES = (1, 2, 3, 17, 1000)
RADIX_SIZES = (16_385, 150_001)
MULTI_CHUNK = 600_001
KINDS = ("randn", "duplicates", "all_equal", "signed_zeros", "infinities", "narrow", "subnormal")


def make_scores(kind: str, n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Scores of a given tie structure (built in float32, then rounded to ``dtype``)."""
    if kind == "randn":
        x = torch.randn(n, generator=g)
    elif kind == "duplicates":
        x = torch.randint(0, 5, (n,), generator=g).float() - 2.0
    elif kind == "all_equal":
        x = torch.full((n,), 0.75)
    elif kind == "signed_zeros":  # -0.0 must tie with +0.0
        x = torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
        x[torch.rand(n, generator=g) < 0.1] = 1.0
        x[torch.rand(n, generator=g) < 0.1] = -1.0
    elif kind == "infinities":
        x = torch.randn(n, generator=g)
        u = torch.rand(n, generator=g)
        x[u < 0.2] = float("inf")
        x[u > 0.8] = float("-inf")
    elif kind == "narrow":  # most keys share their top 16 bits: exercises the second radix pass
        x = 1.0 + torch.randn(n, generator=g) * 1e-4
    elif kind == "subnormal":  # float32 subnormals and their negatives
        x = torch.randn(n, generator=g) * 1e-40
    else:
        raise ValueError(kind)
    return x.to(dtype)


def k_values(n: int, g: torch.Generator) -> list[int]:
    random_k = int(torch.randint(0, n + 1, (1,), generator=g))
    return sorted({0, 1, n // 100, n // 2, n - 1, n, random_k} & set(range(n + 1)))


def numpy_topk(scores: torch.Tensor, k: int, largest: bool) -> np.ndarray:
    """Independent definition: order by (score, index) with numpy's lexsort, keep k, sort."""
    values = scores.double().numpy()
    values = values + 0.0  # -0.0 + 0.0 == +0.0: signed zeros compare equal anyway
    primary = -values if largest else values
    order = np.lexsort((np.arange(values.shape[0]), primary))
    return np.sort(order[:k])


def check_against_reference(backend: str, scores: torch.Tensor, k: int, largest: bool) -> None:
    before = scores.clone()
    got = rk.select_topk(scores, k, largest=largest, backend=backend)
    want = reference.select_topk(scores, k, largest)
    assert got.dtype == torch.int64 and got.shape == (k,) and got.device == scores.device
    assert torch.equal(got, want), (backend, scores.dtype, scores.shape, k, largest)
    assert torch.equal(scores, before)


# ---------------------------------------------------------------------------------------------
# The reference against numpy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (1, 7, 1000))
def test_reference_matches_numpy(kind, dtype, n, generator):
    scores = make_scores(kind, n, dtype, generator)
    for k in k_values(n, generator):
        for largest in (True, False):
            got = reference.select_topk(scores, k, largest)
            np.testing.assert_array_equal(got.numpy(), numpy_topk(scores, k, largest))


# ---------------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_sizes(backend, kind, dtype, generator):
    for n in SMALL_SIZES:
        scores = make_scores(kind, n, dtype, generator)
        for k in k_values(n, generator):
            for largest in (True, False):
                check_against_reference(backend, scores, k, largest)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_radix_sizes(backend, kind, dtype, generator):
    for n in RADIX_SIZES:
        scores = make_scores(kind, n, dtype, generator)
        for k in (1, n // 100, n // 2, n - 1):
            for largest in (True, False):
                check_against_reference(backend, scores, k, largest)


@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize(
    "kind,dtype",
    [(kind, torch.float32) for kind in ("randn", "duplicates", "all_equal")]
    + [("duplicates", torch.bfloat16)],
)
def test_multi_chunk(threads, kind, dtype, generator):
    """One chunk per thread: keys equal to the threshold are shared out across chunks, lowest
    indices first (3 threads: uneven chunk boundaries, and chunks short enough for 11-bit
    digits)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ extension is not built")
    scores = make_scores(kind, MULTI_CHUNK, dtype, generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in (MULTI_CHUNK // 100, MULTI_CHUNK // 2 + 1, MULTI_CHUNK - 3):
            check_against_reference("cpu", scores, k, True)
        check_against_reference("cpu", scores, MULTI_CHUNK // 3, False)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "backend,n", [(b, n) for b in BACKENDS for n in (5, 1000)] + [(b, 40_000) for b in NATIVE]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(backend, n, dtype, generator):
    base = make_scores("duplicates", 3 * n, dtype, generator)
    views = {
        "strided": base[::3],
        "column": base.view(n, 3)[:, 1],
        "expanded": base[:1].expand(n),  # stride 0: n equal scores
    }
    for name, scores in views.items():
        assert not scores.is_contiguous(), name
        for k in (1, n // 3, n - 1):
            for largest in (True, False):
                check_against_reference(backend, scores, k, largest)
                got = rk.select_topk(scores, k, largest=largest, backend=backend)
                assert torch.equal(got, reference.select_topk(scores.contiguous(), k, largest))


@pytest.mark.parametrize("backend", BACKENDS)
def test_documented_examples(backend):
    x = torch.tensor([1.0, 3.0, 3.0, -0.0, 0.0, float("inf"), float("-inf"), 3.0])
    select = lambda k, largest=True: rk.select_topk(x, k, largest=largest, backend=backend)
    assert select(0).tolist() == []
    assert select(1).tolist() == [5]
    assert select(3).tolist() == [1, 2, 5]  # the third 3.0 (index 7) loses the tie
    assert select(8).tolist() == list(range(8))
    assert select(1, False).tolist() == [6]
    assert select(2, False).tolist() == [3, 6]  # -0.0 and 0.0 tie: the lower index wins
    assert select(3, False).tolist() == [3, 4, 6]
    one = torch.tensor([2.5])
    assert rk.select_topk(one, 1, backend=backend).tolist() == [0]
    assert rk.select_topk(one, 0, largest=False, backend=backend).tolist() == []
    empty = torch.empty(0)
    assert rk.select_topk(empty, 0, backend=backend).tolist() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_requiring_grad(backend, generator):
    logits = torch.randn(50, generator=generator, requires_grad=True)
    scores = logits * 2.0
    got = rk.select_topk(scores, 7, backend=backend)
    assert not got.requires_grad
    assert torch.equal(got, reference.select_topk(scores.detach(), 7, True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_bit_patterns(dtype):
    """Largest and smallest finite values, subnormals and infinities order correctly."""
    info = torch.finfo(dtype)
    values = [0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny, info.smallest_normal / 4]
    values += [float("inf"), float("-inf"), 1.0, -1.0]
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    for backend in BACKENDS:
        for k in range(len(values) + 1):
            for largest in (True, False):
                check_against_reference(backend, x, k, largest)


# ---------------------------------------------------------------------------------------------
# NaN and other bad input: ValueError/TypeError naming the argument; nothing modified
# ---------------------------------------------------------------------------------------------

# NaN bit patterns with either sign and small or large payloads, per dtype.
NAN_BITS = {
    torch.float32: (torch.int32, [0x7FC00000, 0x7F800001, -1, -0x7FFFFF]),
    torch.float16: (torch.int16, [0x7E00, 0x7C01, -1, -0x3FF]),
    torch.bfloat16: (torch.int16, [0x7FC0, 0x7F81, -1, -0x7F]),
}


@pytest.mark.parametrize(
    "backend,n", [(b, 10) for b in BACKENDS] + [(b, 40_000) for b in ("reference", *NATIVE)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_rejected(backend, n, dtype, generator):
    int_dtype, patterns = NAN_BITS[dtype]
    for pattern in patterns:
        scores = torch.randn(n, generator=generator).to(dtype)
        scores.view(int_dtype)[n // 2] = pattern
        assert torch.isnan(scores[n // 2])
        before = scores.clone()
        for k in (0, 1, n // 2, n):
            with pytest.raises(ValueError, match="scores must not contain NaN, got 1"):
                rk.select_topk(scores, k, backend=backend)
        assert torch.equal(scores.view(int_dtype), before.view(int_dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend, generator):
    scores = torch.randn(10, generator=generator)
    before = scores.clone()
    cases = [
        ((scores, -1), ValueError, r"k must be in \[0, 10\] \(the number of scores\), got -1"),
        ((scores, 11), ValueError, r"k must be in \[0, 10\] \(the number of scores\), got 11"),
        ((scores, 2.0), TypeError, "k must be an int, got float"),
        ((scores, True), TypeError, "k must be an int, got bool"),
        ((scores.view(2, 5), 1), ValueError, r"scores must be 1-D \[N\], got shape \(2, 5\)"),
        ((scores.double(), 1), TypeError, "scores must have dtype .*, got torch.float64"),
        ((scores.long(), 1), TypeError, "scores must have dtype .*, got torch.int64"),
        (([1.0, 2.0], 1), TypeError, "scores must be a torch.Tensor, got list"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            rk.select_topk(*args, backend=backend)
    with pytest.raises(TypeError, match="largest must be a bool, got int"):
        rk.select_topk(scores, 1, largest=1, backend=backend)
    assert torch.equal(scores, before)


def test_compiled_kernel_checks_its_arguments():
    """The C++ op itself rejects what the Python layer would (direct torch.ops calls)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ extension is not built")
    op = torch.ops.rela.select_topk
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
        op(torch.zeros(3), 4, True)
    with pytest.raises(ValueError, match="1-D"):
        op(torch.zeros(3, 1), 1, True)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        op(torch.zeros(3, dtype=torch.float64), 1, True)


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------


def test_opcheck(generator):
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ extension is not built")
    for n, k in ((1, 1), (9, 4), (20_000, 300)):
        scores = make_scores("duplicates", n, torch.float32, generator)
        torch.library.opcheck(torch.ops.rela.select_topk.default, (scores, k, True))
    z, p, t = make_loss_inputs(11, 6, 7, torch.float32, generator, zero_rows=False)
    torch.library.opcheck(
        torch.ops.rela.score_and_select.default, (z, p, t.mean, t.matrix, t.bias, 1e-8, 4, False)
    )


# Raised inside torch's own compile stack (torch 2.13), not by this library.
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.* is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph(generator):
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    scores = torch.randn(1000, generator=generator)

    def step(x):
        return rk.select_topk(x * 2.0, 37, largest=False, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    assert torch.equal(compiled(scores), step(scores))


# ---------------------------------------------------------------------------------------------
# score_and_select
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("contiguous", "transposed"))
def test_score_and_select(backend, dtype, layout, generator):
    b, d, dp = (37, 8, 12) if backend == "triton" else (301, 24, 40)
    z, p, t = make_loss_inputs(b, d, dp, dtype, generator, layout, zero_rows=False)
    z[5] = z[4]  # equal rows: equal losses, a tie the lower index must win
    p[5] = p[4]
    want_losses = reference.transported_cosine_loss(z, p, t.mean, t.matrix, t.bias)
    inputs = [x.clone() for x in (z, p)]
    for k in (0, 1, b // 3, b - 1, b):
        for largest in (True, False):
            indices, losses = rk.score_and_select(z, p, t, k, largest=largest, backend=backend)
            assert indices.dtype == torch.int64 and indices.shape == (k,)
            assert losses.dtype == torch.float32 and losses.shape == (b,)
            tol = 1e-2 if backend == "triton" and dtype != torch.float32 else 1e-5
            torch.testing.assert_close(losses, want_losses, rtol=tol, atol=tol)
            # The selection is exactly select_topk of the losses the op returned (a last-bit
            # difference from the reference losses may legitimately reorder near-ties).
            assert torch.equal(indices, reference.select_topk(losses, k, largest))
    assert all(torch.equal(x, y) for x, y in zip((z, p), inputs, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_and_select_bad_input(backend, generator):
    z, p, t = make_loss_inputs(6, 4, 5, torch.float32, generator, zero_rows=False)
    with pytest.raises(ValueError, match=r"k must be in \[0, 6\] .*got 7"):
        rk.score_and_select(z, p, t, 7, backend=backend)
    with pytest.raises(ValueError, match=r"k must be in \[0, 6\] .*got -1"):
        rk.score_and_select(z, p, t, -1, backend=backend)
    with pytest.raises(TypeError, match="largest must be a bool"):
        rk.score_and_select(z, p, t, 2, largest="yes", backend=backend)
    with pytest.raises(ValueError, match="z must have 6 rows"):
        rk.score_and_select(z[:5], p, t, 2, backend=backend)
    bad = p.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="p must be finite"):
        rk.score_and_select(z, bad, t, 2, backend=backend)
