"""fit_pca_whitening and fit_least_squares against independent float64 NumPy computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import rela_kernels as rk
from rela_kernels.fitting import _gram


def anisotropic(
    generator: torch.Generator, n: int, d: int, offset: float = 0.0, spread: float = 3.0
) -> torch.Tensor:
    """Rows with well-separated covariance eigenvalues (10^spread down to 1) and a common offset."""
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    scales = torch.logspace(spread / 2, 0, d, dtype=torch.float64)
    z = torch.randn(n, d, generator=generator, dtype=torch.float64)
    mean = offset + torch.randn(d, generator=generator, dtype=torch.float64)
    return z * scales @ basis.T + mean


def numpy_whitening(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: float64 mean, population covariance, eigh, sign rule, 1/sqrt(λ)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / len(x)
    values, vectors = np.linalg.eigh(covariance)
    top = np.argsort(values)[::-1][:dim]
    vectors = vectors[:, top]
    peak = np.abs(vectors).argmax(axis=0)
    vectors = vectors * np.sign(vectors[peak, np.arange(dim)])
    return mean, vectors / np.sqrt(values[top])


def paper_targets(x: np.ndarray, dim: int) -> np.ndarray:
    """The paper's recipe: centre, covariance, top components, project, z-score (population std)."""
    centred = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    projected = centred @ vectors[:, np.argsort(values)[::-1][:dim]]
    return (projected - projected.mean(axis=0)) / projected.std(axis=0)  # ddof=0: population


def apply(t: rk.Transport, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The transport in float64, independent of the op backends."""
    x = torch.as_tensor(x).double()
    y = (x - t.mean.double()) @ t.matrix.double()
    return (y if t.bias is None else y + t.bias.double()).numpy()


def test_pca_whitening_matches_float64_numpy(generator: torch.Generator) -> None:
    x = anisotropic(generator, 3001, 37, offset=40.0)
    t = rk.fit_pca_whitening(x, 11)
    mean, matrix = numpy_whitening(x.numpy(), 11)
    assert t.mean.dtype == torch.float32 and t.matrix.shape == (37, 11) and t.bias is None
    np.testing.assert_allclose(t.mean.numpy(), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t.matrix.numpy(), matrix, rtol=1e-4, atol=1e-6 * abs(matrix).max())
    # Deterministic signs: the largest-magnitude entry of each component is positive.
    columns = t.matrix.numpy()
    assert (columns[np.abs(columns).argmax(axis=0), np.arange(11)] > 0).all()


def test_pca_whitening_reproduces_the_papers_targets(generator: torch.Generator) -> None:
    x = anisotropic(generator, 2000, 24, offset=5.0)
    ours = apply(rk.fit_pca_whitening(x, 9), x)
    paper = paper_targets(x.numpy(), 9)
    signs = np.sign((ours * paper).sum(axis=0))  # each component is defined up to its sign
    np.testing.assert_allclose(ours, paper * signs, atol=2e-4)
    np.testing.assert_allclose(ours.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.cov(ours, rowvar=False, bias=True), np.eye(9), atol=1e-5)
    # And through the public op, in float32.
    np.testing.assert_allclose(rk.fit_pca_whitening(x, 9)(x.float()).numpy(), ours, atol=1e-3)


def test_streaming_over_chunks_equals_one_shot(generator: torch.Generator, tmp_path: Path) -> None:
    x = anisotropic(generator, 1500, 20, offset=3.0).to(torch.float16)
    one_shot = rk.fit_pca_whitening(x, 7)
    cuts = [0, 1, 1, 400, 401, 1100, 1500]  # includes an empty chunk and a single row
    pieces = [x[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    as_arrays = [piece.numpy() for piece in pieces]
    store = rk.EmbeddingStore.create_or_resume(
        tmp_path / "s", 1500, 20, fingerprint="f", prior="p", input_size=None, chunk_rows=256
    )
    for start, stop in store.pending_chunks():
        store.write_chunk(start, x[start:stop])
    store.close()
    for source in (pieces, iter(as_arrays), x.numpy(), rk.EmbeddingStore.open(tmp_path / "s")):
        t = rk.fit_pca_whitening(source, 7)
        np.testing.assert_allclose(t.mean.numpy(), one_shot.mean.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(t.matrix.numpy(), one_shot.matrix.numpy(), rtol=1e-5, atol=1e-7)


def test_drifting_chunks_and_large_offsets_cost_no_precision(generator: torch.Generator) -> None:
    # Class-sorted data: every chunk has its own mean, all far from zero.
    base = anisotropic(generator, 4000, 16, offset=1e4, spread=2.0)
    shifts = torch.repeat_interleave(
        torch.randn(8, 16, generator=generator, dtype=torch.float64), 500, 0
    )
    x = base + 30 * shifts
    chunks = list(x.split(500))
    t = rk.fit_pca_whitening(chunks, 16)
    mean, matrix = numpy_whitening(x.numpy(), 16)
    np.testing.assert_allclose(t.mean.numpy(), mean, rtol=1e-7)
    np.testing.assert_allclose(t.matrix.numpy(), matrix, rtol=1e-4, atol=1e-6 * abs(matrix).max())


def test_float32_gemm_accumulation_stays_close_to_float64(generator: torch.Generator) -> None:
    # The documented trade-off behind the float64 default: float32 per-chunk GEMMs are accurate
    # to ~1e-6 of the covariance's scale, visible in the smallest kept components.
    x = anisotropic(generator, 8000, 256, offset=2.0, spread=2.0).to(torch.float16)
    exact = rk.fit_pca_whitening(x, 64)
    fast = rk.fit_pca_whitening(x, 64, gemm_dtype=torch.float32)
    np.testing.assert_allclose(fast.mean.numpy(), exact.mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.abs(fast.matrix.numpy()).sum(0), np.abs(exact.matrix.numpy()).sum(0), rtol=1e-3
    )


def test_gram_split_matches_full_product(generator: torch.Generator) -> None:
    for d in (5, 255, 256, 301):
        x = torch.randn(77, d, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(_gram(x), x.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(generator: torch.Generator, dtype: torch.dtype) -> None:
    x = anisotropic(generator, 600, 12, spread=1.0).to(dtype)
    mean, matrix = numpy_whitening(x.double().numpy(), 5)
    t = rk.fit_pca_whitening(x, 5)
    np.testing.assert_allclose(t.matrix.numpy(), matrix, rtol=1e-4, atol=1e-5)


def test_pca_whitening_errors(generator: torch.Generator) -> None:
    x = anisotropic(generator, 300, 8)
    with pytest.raises(ValueError, match="dim=9 is larger than the embedding width D=8"):
        rk.fit_pca_whitening(x, 9)
    with pytest.raises(ValueError, match="dim=9 is larger"):
        rk.fit_pca_whitening(iter([x[:100], x[100:]]), 9)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        rk.fit_pca_whitening(x, 0)
    with pytest.raises(TypeError, match="dim must be an int"):
        rk.fit_pca_whitening(x, 2.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        rk.fit_pca_whitening(x[:1], 1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        rk.fit_pca_whitening([], 1)
    bad = x.clone()
    bad[123, 4] = float("inf")
    with pytest.raises(
        ValueError, match=r"non-finite values in row 123 \(chunk 1, rows 100\.\.199\)"
    ):
        rk.fit_pca_whitening(list(bad.split(100)), 2)
    with pytest.raises(ValueError, match="row 123"):
        rk.fit_pca_whitening(bad.numpy(), 2)
    # Rank-deficient: 5 rows span 4 centred dimensions.
    with pytest.raises(ValueError, match="only 4 principal components .* Use dim <= 4"):
        rk.fit_pca_whitening(x[:5], 6)
    rk.fit_pca_whitening(x[:5], 4)
    low_rank = torch.randn(200, 3, generator=generator, dtype=torch.float64) @ torch.randn(
        3, 8, generator=generator, dtype=torch.float64
    )
    with pytest.raises(ValueError, match="Use dim <= 3"):
        rk.fit_pca_whitening(low_rank, 4)
    with pytest.raises(ValueError, match="identical"):
        rk.fit_pca_whitening(torch.ones(10, 4), 1)
    with pytest.raises(ValueError, match="must be 2-D"):
        rk.fit_pca_whitening(x[0], 1)
    with pytest.raises(TypeError, match="floating point"):
        rk.fit_pca_whitening(torch.ones(10, 4, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="chunk 1 has 7 columns, earlier chunks have 8"):
        rk.fit_pca_whitening([x[:10], x[10:20, :7]], 1)
    with pytest.raises(TypeError, match="iterable of 2-D chunks"):
        rk.fit_pca_whitening("embeddings.npy", 1)
    with pytest.raises(TypeError, match="chunk 0 is a list"):
        rk.fit_pca_whitening([[1.0, 2.0]], 1)


def test_least_squares_recovers_an_exact_affine_map(generator: torch.Generator) -> None:
    src = anisotropic(generator, 900, 10, offset=3.0, spread=1.0)
    weight = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    bias = torch.randn(6, generator=generator, dtype=torch.float64)
    dst = src @ weight + bias
    t = rk.fit_least_squares(src, dst, 0.0)
    np.testing.assert_allclose(t.matrix.numpy(), weight.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply(t, src), dst.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(t.mean.numpy(), src.mean(0).numpy(), rtol=1e-6)


def test_least_squares_matches_closed_form_ridge(generator: torch.Generator) -> None:
    src = anisotropic(generator, 500, 12, offset=1.0, spread=2.0)
    dst = torch.randn(500, 5, generator=generator, dtype=torch.float64) + src[:, :5] ** 2
    ridge = 0.1
    t = rk.fit_least_squares(list(src.split(128)), list(dst.split(128)), ridge)
    xs, ys = src.numpy() - src.numpy().mean(0), dst.numpy() - dst.numpy().mean(0)
    c_ss, c_sd = xs.T @ xs / 500, xs.T @ ys / 500
    expected = np.linalg.solve(c_ss + ridge * np.trace(c_ss) / 12 * np.eye(12), c_sd)
    np.testing.assert_allclose(t.matrix.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t.bias.numpy(), dst.numpy().mean(0), rtol=1e-6)
    # Scale-free: scaling src by 100 scales W by 1/100 and changes nothing else.
    scaled = rk.fit_least_squares(100 * src, dst, ridge)
    np.testing.assert_allclose(100 * scaled.matrix.numpy(), t.matrix.numpy(), rtol=1e-4)


def test_least_squares_rank_deficient_gives_minimum_norm(generator: torch.Generator) -> None:
    latent = torch.randn(300, 4, generator=generator, dtype=torch.float64)
    src = latent @ torch.randn(4, 9, generator=generator, dtype=torch.float64)
    dst = latent @ torch.randn(4, 3, generator=generator, dtype=torch.float64)
    t = rk.fit_least_squares(src, dst)
    xs = src.numpy() - src.numpy().mean(0)
    ys = dst.numpy() - dst.numpy().mean(0)
    expected = np.linalg.lstsq(xs, ys, rcond=None)[0]
    np.testing.assert_allclose(t.matrix.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_least_squares_errors(generator: torch.Generator, tmp_path: Path) -> None:
    src = torch.randn(50, 4, generator=generator)
    dst = torch.randn(50, 3, generator=generator)
    with pytest.raises(ValueError, match="src has 50 rows but dst has 49"):
        rk.fit_least_squares(src, dst[:49])
    with pytest.raises(ValueError, match="src chunk of 20 rows is paired with a dst chunk of 25"):
        rk.fit_least_squares([src[:20], src[20:]], [dst[:25], dst[25:]])
    with pytest.raises(ValueError, match="dst ran out after 20 rows"):
        rk.fit_least_squares([src[:20], src[20:]], [dst[:20]])
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
        rk.fit_least_squares(src, dst, -1.0)
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
        rk.fit_least_squares(src, dst, float("nan"))
    with pytest.raises(TypeError, match="ridge must be a float"):
        rk.fit_least_squares(src, dst, True)
    with pytest.raises(ValueError, match="at least 2 rows"):
        rk.fit_least_squares(src[:1], dst[:1])
    bad = dst.clone()
    bad[7, 0] = float("nan")
    with pytest.raises(ValueError, match="dst has non-finite values in row 7"):
        rk.fit_least_squares(src, bad)
    stores = []
    for name in ("a", "b"):
        store = rk.EmbeddingStore.create_or_resume(
            tmp_path / name, 50, 4, fingerprint=f"data-{name}", prior="p", input_size=None
        )
        store.write_chunk(0, src)
        stores.append(store)
    with pytest.raises(ValueError, match="embed different datasets"):
        rk.fit_least_squares(*stores)
