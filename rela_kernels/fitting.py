"""Fitting a Transport from prior embeddings.

ReLA-D fits it by PCA whitening of the prior's embeddings (``fit_pca_whitening``); diagnostics fit
one prior onto another by ridge regression (``fit_least_squares``). Both stream their input in
chunks and accumulate float64 moments, so memory stays O(D^2) plus one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeAlias

import numpy as np
import torch

from rela_kernels._validation import check_int
from rela_kernels.store import EmbeddingStore
from rela_kernels.transport import Transport

__all__ = ["Embeddings", "fit_least_squares", "fit_pca_whitening"]

Embeddings: TypeAlias = (
    torch.Tensor | np.ndarray | EmbeddingStore | Iterable[torch.Tensor | np.ndarray]
)

# Rows per streamed chunk: large enough for efficient GEMMs, small enough that the float64 copy of
# a chunk (16384 x 768 x 8 B = 100 MB) keeps memory far below a full copy of the embeddings.
_CHUNK_ROWS = 16384

# A kept principal component whose variance is below this fraction of the largest is rejected.
# Whitening scales it up by more than 1000x relative to the top component; for embeddings stored
# as float16 (11-bit mantissa, relative rounding ~2.4e-4) such a direction is dominated by
# rounding noise, and an exactly rank-deficient set of embeddings lands far below it.
_MIN_RELATIVE_VARIANCE = 1e-6

# Below this width a Gram matrix is one GEMM; above it, _gram splits off the redundant half.
_GRAM_SPLIT_WIDTH = 256


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x.T @ x`` computing only the upper block triangle (about 3/4 of the FLOPs at D=768).

    BLAS through torch has no SYRK, so a plain ``mm`` also computes the mirror half. Splitting the
    columns in two computes ``A^T A``, ``A^T B`` and ``B^T B`` only. Splitting further saves more
    FLOPs in theory, but narrow GEMMs gain little; one split keeps it simple.
    """
    d = x.shape[1]
    if d < _GRAM_SPLIT_WIDTH:
        return x.T @ x
    h = d // 2
    a, b = x[:, :h], x[:, h:]
    out = x.new_empty((d, d))
    out[:h, :h] = a.T @ a
    out[:h, h:] = a.T @ b
    out[h:, h:] = b.T @ b
    out[h:, :h] = out[:h, h:].T
    return out


class _Moments:
    """Streaming mean and centred co-moments, merged chunk by chunk (Chan, Golub & LeVeque).

    Each chunk is centred on its own mean before its Gram matrix is taken, and chunk results are
    merged exactly in float64 with the correction ``outer(delta, delta) * n_a * n_b / n``. Unlike
    ``sum(x x^T) - n mean mean^T`` this never subtracts two large nearly equal numbers, so a large
    common offset in the embeddings costs no precision; unlike a fixed shift (e.g. the first
    chunk's mean) it stays exact when the data drift along the file, as a class-sorted dataset
    does.

    ``gemm_dtype`` is the dtype of each chunk's Gram GEMM (the merge is always float64). The
    library uses float64 by default: float32's error is relative to the largest eigenvalue, so it
    grows with the spread of the spectrum and lands on the smallest kept components first, while
    float64 keeps the covariance exact to the rounding of the data itself. float32 GEMMs are
    faster but the conversion and centring passes over the data cost the same in both, so the
    gain is modest; benchmarks/bench_pca.py measures both (figures in benchmarks/results/).
    """

    def __init__(self, gemm_dtype: torch.dtype = torch.float64) -> None:
        self.gemm_dtype = gemm_dtype
        self.n = 0
        self.mean_x: torch.Tensor | None = None
        self.mean_y: torch.Tensor | None = None
        self.m_xx: torch.Tensor | None = None  # sum over rows of (x - mean_x)(x - mean_x)^T
        self.m_xy: torch.Tensor | None = None  # sum over rows of (x - mean_x)(y - mean_y)^T

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        rows = x.shape[0]
        if rows == 0:
            return
        # One float64 copy of the chunk, centred in place (never the caller's tensor).
        xc = x.to(torch.float64, copy=True)
        mean_x = xc.mean(0)
        xc = xc.sub_(mean_x).to(self.gemm_dtype)
        m_xx = _gram(xc).to(torch.float64)
        if y is not None:
            yc = y.to(torch.float64, copy=True)
            mean_y = yc.mean(0)
            m_xy = (xc.T @ yc.sub_(mean_y).to(self.gemm_dtype)).to(torch.float64)
        if self.n == 0:
            self.n, self.mean_x, self.m_xx = rows, mean_x, m_xx
            if y is not None:
                self.mean_y, self.m_xy = mean_y, m_xy
            return
        n = self.n + rows
        weight = self.n * rows / n
        delta_x = mean_x - self.mean_x
        self.m_xx += m_xx
        self.m_xx.addr_(delta_x, delta_x, alpha=weight)
        self.mean_x += delta_x * (rows / n)
        if y is not None:
            delta_y = mean_y - self.mean_y
            self.m_xy += m_xy
            self.m_xy.addr_(delta_x, delta_y, alpha=weight)
            self.mean_y += delta_y * (rows / n)
        self.n = n


def _to_tensor(where: str, name: str, value: object, index: int) -> torch.Tensor:
    """One chunk as a 2-D floating tensor (zero-copy where possible)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise TypeError(
                f"{where}: {name} chunk {index} must be floating point, got {value.dtype}"
            )
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{where}: {name} must be a tensor, an ndarray, an EmbeddingStore or an iterable of "
            f"2-D chunks; chunk {index} is a {type(value).__name__}"
        )
    elif not value.is_floating_point():
        raise TypeError(f"{where}: {name} chunk {index} must be floating point, got {value.dtype}")
    if value.dim() != 2:
        raise ValueError(
            f"{where}: {name} chunk {index} must be 2-D [rows, D], got shape {tuple(value.shape)}"
        )
    return value.detach()


def _describe(source: object) -> tuple[int | None, int | None]:
    """(rows, width) when known without reading the data."""
    if isinstance(source, EmbeddingStore):
        return source.n, source.dim
    if isinstance(source, (torch.Tensor, np.ndarray)) and source.ndim == 2:
        return source.shape[0], source.shape[1]
    return None, None


def _chunks(
    where: str,
    name: str,
    source: object,
    device: torch.device | None,
    keep: np.ndarray | None = None,
) -> Iterator[torch.Tensor]:
    """Validated float chunks of ``source`` on ``device`` with one width, all rows finite.

    A store yields only its valid rows (skipped inputs left out), or the rows ``keep`` marks."""
    if isinstance(source, EmbeddingStore):
        source.require_complete(where)
        mask = source.valid if keep is None else keep
        raw: Iterable[object] = (
            rows[mask[first : first + len(rows)]]
            for first, rows in zip(
                range(0, source.n, _CHUNK_ROWS), source.iter_chunks(_CHUNK_ROWS), strict=True
            )
        )
    elif isinstance(source, (torch.Tensor, np.ndarray)):
        if source.ndim != 2:
            raise ValueError(f"{where}: {name} must be 2-D [N, D], got shape {tuple(source.shape)}")
        raw = (source[i : i + _CHUNK_ROWS] for i in range(0, source.shape[0], _CHUNK_ROWS))
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes, Mapping)):
        raw = source
    else:
        raise TypeError(
            f"{where}: {name} must be a tensor, an ndarray, an EmbeddingStore or an iterable of "
            f"2-D chunks, got {type(source).__name__}"
        )
    width = None
    first_device: torch.device | None = None
    row = 0
    for index, value in enumerate(raw):
        chunk = _to_tensor(where, name, value, index)
        if width is None:
            width = chunk.shape[1]
            if width == 0:
                raise ValueError(f"{where}: {name} has zero columns")
        elif chunk.shape[1] != width:
            raise ValueError(
                f"{where}: {name} chunk {index} has {chunk.shape[1]} columns, earlier chunks "
                f"have {width}"
            )
        if device is not None:
            chunk = chunk.to(device, non_blocking=True)
        if first_device is None:
            first_device = chunk.device
        elif chunk.device != first_device:
            raise ValueError(
                f"{where}: {name} chunk {index} is on {chunk.device} but chunk 0 is on "
                f"{first_device}; pass device= to move every chunk to one device"
            )
        finite = torch.isfinite(chunk).all(dim=1)
        if not bool(finite.all()):
            bad = row + int(torch.nonzero(~finite)[0, 0])
            raise ValueError(
                f"{where}: {name} has non-finite values in row {bad} (chunk {index}, rows "
                f"{row}..{row + chunk.shape[0] - 1})"
            )
        row += chunk.shape[0]
        yield chunk


def _check_dim(where: str, dim: int, width: int | None) -> None:
    if width is not None and dim > width:
        raise ValueError(
            f"{where}: dim={dim} is larger than the embedding width D={width}; use dim <= {width}"
        )


def fit_pca_whitening(
    embeddings_or_chunks: Embeddings,
    dim: int,
    *,
    device: torch.device | str | None = None,
    gemm_dtype: torch.dtype = torch.float64,
    clip_to_rank: bool = False,
) -> Transport:
    """The ReLA-D transport: PCA whitening of prior embeddings down to ``dim`` components.

    ``transport(p) = (p - mean) @ V[:, :dim] / sqrt(lambda[:dim])``, where ``lambda, V`` are the
    eigenvalues (descending) and eigenvectors of the population covariance (divided by N). The
    outputs therefore have zero mean and unit population variance per component on the fitted
    data: exactly the paper's targets (centre, project on the top components, z-score with the
    global mean and population std). Each eigenvector's largest-magnitude entry is made positive,
    so the result does not depend on the eigensolver's sign choice.

    Args:
        embeddings_or_chunks: ``[N, D]`` tensor or ndarray (any float dtype), a complete
            :class:`EmbeddingStore`, or an iterable of ``[rows, D]`` chunks. Streamed in chunks
            with float64 statistics, so memory is O(D^2) plus one chunk.
        dim: number of components kept, ``1 <= dim <= D``.
        device: where the accumulation runs (default: each chunk's own device, CPU for stores
            and ndarrays). The returned transport is on CPU.
        gemm_dtype: dtype of each chunk's Gram GEMM (the merge is always float64). float64, the
            default, keeps the covariance exact; float32 is faster and less accurate on the
            smallest kept components (see ``_Moments``).
        clip_to_rank: when fewer than ``dim`` components have non-negligible variance (more
            than 1e-6 x the largest), keep only those instead of raising: the transport's
            ``out_dim`` is then the usable rank (compare it with ``dim`` to warn). Whitening a
            (near-)zero-variance component would only scale numerical noise to unit variance.

    Raises:
        ValueError: ``dim`` out of range, fewer than 2 rows, non-finite values (naming the row),
            an incomplete store, or (without ``clip_to_rank``) a kept component with (near-)zero
            variance.
    """
    where = "rk.fit_pca_whitening"
    dim = check_int(where, "dim", dim, 1)
    if gemm_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{where}: gemm_dtype must be torch.float32 or torch.float64, got {gemm_dtype!r}"
        )
    _check_dim(where, dim, _describe(embeddings_or_chunks)[1])
    device = None if device is None else torch.device(device)
    moments = _Moments(gemm_dtype)
    for chunk in _chunks(where, "embeddings", embeddings_or_chunks, device):
        if moments.n == 0:
            _check_dim(where, dim, chunk.shape[1])
        moments.add(chunk)
    if moments.n < 2:
        raise ValueError(f"{where}: need at least 2 rows to estimate a covariance, got {moments.n}")
    covariance = moments.m_xx / moments.n
    covariance = 0.5 * (covariance + covariance.T)  # exact symmetry for eigh
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = torch.argsort(eigenvalues, descending=True, stable=True)
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    largest = float(eigenvalues[0])
    if largest <= 0.0:
        raise ValueError(f"{where}: all {moments.n} embeddings are identical (zero variance)")
    kept = eigenvalues[:dim]
    floor = largest * _MIN_RELATIVE_VARIANCE
    usable = int((eigenvalues > floor).sum())
    if float(kept[-1]) <= floor and clip_to_rank:
        dim = usable  # >= 1: the largest eigenvalue is above the floor
        kept = eigenvalues[:dim]
    elif float(kept[-1]) <= floor:
        raise ValueError(
            f"{where}: only {usable} principal components have non-negligible variance "
            f"(> {_MIN_RELATIVE_VARIANCE:g} x the largest), but dim={dim} were requested; the "
            f"embeddings are (nearly) rank-deficient (N={moments.n}, D={covariance.shape[0]}). "
            f"Use dim <= {usable}"
        )
    vectors = eigenvectors[:, :dim]
    peak = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[peak, torch.arange(dim, device=vectors.device)])
    matrix = vectors * signs / kept.sqrt()
    return Transport(moments.mean_x.cpu(), matrix.cpu())


def fit_least_squares(
    src: Embeddings,
    dst: Embeddings,
    ridge: float = 0.0,
    *,
    device: torch.device | str | None = None,
) -> Transport:
    """The affine map ``src -> dst`` of least squared error, with an optional ridge penalty.

    Minimises ``mean_i ||(src_i - mean_src) @ W + b - dst_i||^2 + ridge * s * ||W||_F^2`` where
    ``s`` is the mean variance of src's columns, so ``ridge`` is scale-free (the same value means
    the same shrinkage whatever the embeddings' norm). The solution is ``b = mean(dst)`` and
    ``W = (C_ss + ridge * s * I)^+ C_sd`` from float64 population covariances; with ``ridge=0``
    and a singular ``C_ss`` it is the minimum-norm solution. Returns ``Transport(mean_src, W, b)``.

    Args:
        src, dst: ``[N, Ds]`` and ``[N, Dd]`` rows of the same samples: tensors, ndarrays,
            complete EmbeddingStores (with the same dataset fingerprint), or iterables of chunks
            whose row counts match pairwise.
        ridge: penalty, ``>= 0``.
        device: where the accumulation runs; the returned transport is on CPU.
    """
    where = "rk.fit_least_squares"
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"{where}: ridge must be a float, got {type(ridge).__name__}")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"{where}: ridge must be a finite number >= 0, got {ridge}")
    if isinstance(src, EmbeddingStore) and isinstance(dst, EmbeddingStore):
        if src.fingerprint != dst.fingerprint:
            raise ValueError(
                f"{where}: src ({src.path}) and dst ({dst.path}) embed different datasets "
                f"(fingerprints {src.fingerprint[:12]}... and {dst.fingerprint[:12]}...)"
            )
    (n_src, _), (n_dst, _) = _describe(src), _describe(dst)
    if n_src is not None and n_dst is not None and n_src != n_dst:
        raise ValueError(f"{where}: src has {n_src} rows but dst has {n_dst}")
    device = None if device is None else torch.device(device)
    moments = _Moments()
    for x, y in _paired_chunks(where, src, dst, device):
        moments.add(x, y)
    if moments.n < 2:
        raise ValueError(f"{where}: need at least 2 rows, got {moments.n}")
    c_ss = moments.m_xx / moments.n
    c_sd = moments.m_xy / moments.n
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (c_ss + c_ss.T))
    eigenvalues = eigenvalues.clamp_min(0.0) + ridge * float(torch.diagonal(c_ss).mean())
    # Pseudo-inverse cut-off: directions with (regularised) variance at rounding level carry no
    # information; inverting them would only amplify noise.
    cutoff = float(eigenvalues.max()) * c_ss.shape[0] * torch.finfo(torch.float64).eps
    inverse = torch.where(eigenvalues > cutoff, 1.0 / eigenvalues, torch.zeros_like(eigenvalues))
    matrix = eigenvectors @ (inverse[:, None] * (eigenvectors.T @ c_sd))
    return Transport(moments.mean_x.cpu(), matrix.cpu(), moments.mean_y.cpu())


def _paired_chunks(
    where: str, src: Embeddings, dst: Embeddings, device: torch.device | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    keep = None
    if isinstance(src, EmbeddingStore) and isinstance(dst, EmbeddingStore):
        keep = src.valid & dst.valid  # rows valid in both stores, so pairs stay aligned
    elif any(isinstance(s, EmbeddingStore) and s.skipped for s in (src, dst)):
        raise ValueError(
            f"{where}: a store with skipped rows can only be paired with another store (or pass "
            "both as arrays of the rows to use)"
        )
    src_chunks = _chunks(where, "src", src, device, keep)
    dst_chunks = _chunks(where, "dst", dst, device, keep)
    rows = 0
    while True:
        x = next(src_chunks, None)
        y = next(dst_chunks, None)
        if x is None and y is None:
            return
        if x is None or y is None or x.shape[0] != y.shape[0]:
            short = "src" if x is None else "dst" if y is None else None
            detail = (
                f"{short} ran out after {rows} rows"
                if short
                else f"a src chunk of {x.shape[0]} rows is paired with a dst chunk of {y.shape[0]}"
            )
            raise ValueError(f"{where}: src and dst must have the same rows; {detail}")
        if x.device != y.device:
            raise ValueError(
                f"{where}: src is on {x.device} but dst is on {y.device}; pass device= to "
                "accumulate both on one device"
            )
        rows += x.shape[0]
        yield x, y
