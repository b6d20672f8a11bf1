"""How well one prior's embeddings predict another's: the held-out R² of a linear map A -> B.

The paper's premise is that good representations are *transportable*: a linear map carries one
model's embeddings of a dataset onto another's. This job measures it on two embedding stores of the
same dataset: fit ``rk.fit_least_squares`` on a random (1 - holdout) share of the rows and report
``R² = 1 - SS_res / SS_tot`` on the held-out rows, pooled over all of B's dimensions (so B's
high-variance directions weigh more), with ``SS_tot`` taken about the held-out mean.
Everything streams over the stores in chunks with float64 accumulation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

import rela_kernels as rk

__all__ = ["TransportabilityResult", "transportability"]

_CHUNK_ROWS = 16384


@dataclass(frozen=True)
class TransportabilityResult:
    r2: float
    train_rows: int
    test_rows: int
    a_dim: int
    b_dim: int
    ridge: float
    seed: int


def _open(path: str | os.PathLike[str] | rk.EmbeddingStore, name: str) -> rk.EmbeddingStore:
    store = path if isinstance(path, rk.EmbeddingStore) else rk.EmbeddingStore.open(path)
    store.require_complete(f"transportability ({name})")
    return store


def _rows(store: rk.EmbeddingStore, keep: np.ndarray) -> Iterator[np.ndarray]:
    """The store's rows where ``keep`` is True, chunk by chunk, in order."""
    for first, chunk in zip(
        range(0, store.n, _CHUNK_ROWS), store.iter_chunks(_CHUNK_ROWS), strict=True
    ):
        yield chunk[keep[first : first + len(chunk)]]


def transportability(
    a: str | os.PathLike[str] | rk.EmbeddingStore,
    b: str | os.PathLike[str] | rk.EmbeddingStore,
    *,
    ridge: float = 1e-3,
    holdout: float = 0.2,
    seed: int = 0,
) -> TransportabilityResult:
    """Held-out R² of the ridge-regularised affine map from store ``a``'s rows to ``b``'s."""
    # The settings are checked before any store is opened.
    if isinstance(holdout, bool) or not (0.0 < float(holdout) < 1.0):
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    if isinstance(ridge, bool) or not (math.isfinite(float(ridge)) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    store_a, store_b = _open(a, "A"), _open(b, "B")
    if store_a.fingerprint != store_b.fingerprint or store_a.n != store_b.n:
        raise ValueError(
            f"the stores embed different datasets: {store_a.path} has fingerprint "
            f"{store_a.fingerprint[:12]}... ({store_a.n} rows), {store_b.path} has "
            f"{store_b.fingerprint[:12]}... ({store_b.n} rows)"
        )
    n = store_a.n
    test_rows = int(round(holdout * n))
    train_rows = n - test_rows
    if test_rows < 1 or train_rows < 2:
        raise ValueError(
            f"holdout {holdout} leaves {train_rows} training and {test_rows} held-out rows of "
            f"{n}; need at least 2 and 1"
        )
    generator = torch.Generator().manual_seed(seed)
    test = np.zeros(n, dtype=bool)
    test[torch.randperm(n, generator=generator)[:test_rows].numpy()] = True
    transport = rk.fit_least_squares(_rows(store_a, ~test), _rows(store_b, ~test), ridge)
    r2 = _held_out_r2(transport, _rows(store_a, test), _rows(store_b, test))
    return TransportabilityResult(
        r2, train_rows, test_rows, store_a.dim, store_b.dim, float(ridge), seed
    )


def _held_out_r2(
    transport: rk.Transport, xs: Iterator[np.ndarray], ys: Iterator[np.ndarray]
) -> float:
    mean = transport.mean.double()
    matrix = transport.matrix.double()
    bias = transport.bias.double()
    residual = 0.0
    rows = 0
    # SS_tot about the held-out mean, accumulated about the fitted bias (close to that mean, so
    # the shifted sum of squares loses no precision): sum((y - c)^2) - rows * (mean_y - c)^2.
    shifted_sum = torch.zeros_like(bias)
    shifted_squares = 0.0
    for x, y in zip(xs, ys, strict=True):
        x = torch.from_numpy(x).double()
        y = torch.from_numpy(y).double()
        prediction = (x - mean) @ matrix + bias
        residual += float(((y - prediction) ** 2).sum())
        centred = y - bias
        shifted_sum += centred.sum(0)
        shifted_squares += float((centred**2).sum())
        rows += len(y)
    total = shifted_squares - float((shifted_sum**2).sum()) / rows
    if total <= 0.0:
        raise ValueError("B's held-out embeddings are constant; R² is undefined")
    return 1.0 - residual / total
