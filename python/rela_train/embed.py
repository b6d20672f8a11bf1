"""The embed job: run a prior over an image folder once, store the embeddings, fit the transport.

``embed(data, prior, out)`` fills the EmbeddingStore at ``out`` chunk by chunk (resuming where a
previous run stopped) and then writes ``out/transport.pt``, the PCA-whitening transport whose
outputs are ReLA-D's regression targets.

Batches never straddle a chunk boundary, so every chunk is computed by exactly the same batches in
an uninterrupted run and in a resumed one: a resumed store is byte-identical to an uninterrupted
one (for a deterministic prior on the same device).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import rela_kernels as rk
from rela_train.data.folder import ImageFolder
from rela_train.priors import ModelPrior, PrecomputedPrior, Prior, load_prior

__all__ = ["DEFAULT_MAX_DIM", "TRANSPORT_FILE", "EmbedResult", "embed", "resolve_device"]

TRANSPORT_FILE = "transport.pt"
DEFAULT_MAX_DIM = 256
_TARGET_CHUNK_ROWS = 4096
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class EmbedResult:
    store: Path
    transport: Path
    rows: int  # dataset size
    prior_dim: int  # D, the prior's width
    dim: int  # d, the transport's output width
    computed_rows: int  # rows embedded by this call (0 when the store was already complete)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else must exist here."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available on this machine")
    return device


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def embed(
    data: str | os.PathLike[str],
    prior: str | Prior,
    out: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | torch.device = "auto",
    dim: int | None = None,
    chunk_rows: int | None = None,
    input_size: int | None = None,
    normalize: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _log,
) -> EmbedResult:
    """Embed every image under ``data`` with ``prior`` into the store ``out``; fit the transport.

    Args:
        data: image folder (see :mod:`rela_train.data.folder`).
        prior: a spec string (see :mod:`rela_train.priors`) or a loaded :class:`Prior`.
        out: store directory; created, or resumed when it holds an unfinished store of the same
            dataset and prior.
        batch_size: images per forward pass.
        workers: DataLoader worker processes decoding images (default ``min(8, cpus)``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        dim: transport width d (default ``min(256, D, N - 1)``); ``1 <= d <= min(D, N - 1)``.
        chunk_rows: rows per durable chunk of a new store (default: a multiple of ``batch_size``
            near 4096); a resumed store keeps its own.
        input_size, normalize: override the prior's preprocessing (spec strings only).
        progress: show a progress bar (images/s, ETA) on stderr.

    Raises:
        ValueError / FileNotFoundError: bad arguments or inputs, found before anything is written.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive int, got {batch_size!r}")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    device = resolve_device(device)
    dataset = ImageFolder(data)
    n = len(dataset)
    if isinstance(prior, str):
        prior = load_prior(
            prior, device=device, input_size=input_size, normalize=normalize, num_rows=n
        )
    elif input_size is not None or normalize is not None:
        raise ValueError("input_size/normalize apply to a prior spec, not to a loaded prior")
    elif isinstance(prior, PrecomputedPrior) and prior.rows != n:
        raise ValueError(f"prior {prior.spec}: {prior.rows} rows, but the dataset has {n} images")
    dim = _check_dim(dim, prior.dim, n)
    out = Path(out)
    if chunk_rows is None and not rk.EmbeddingStore.exists(out):
        chunk_rows = batch_size * max(1, _TARGET_CHUNK_ROWS // batch_size)
    metadata = {
        "data": str(Path(data).resolve()),
        "prior_spec": prior.spec,
        "classes": len(dataset.classes),
    }
    with rk.EmbeddingStore.create_or_resume(
        out,
        n,
        prior.dim,
        fingerprint=dataset.fingerprint,
        prior=prior.identity,
        input_size=prior.input_size,
        chunk_rows=chunk_rows,
        metadata=metadata,
    ) as store:
        before = store.rows_done
        if store.complete:
            log(f"{out}: all {n} embeddings already stored")
        else:
            verb = f"resuming at row {before}" if before else "starting"
            log(f"{out}: embedding {n} images with {prior.identity} (D={prior.dim}), {verb}")
            bar = tqdm(
                total=n,
                initial=before,
                unit="img",
                desc="embed",
                disable=not progress,
                dynamic_ncols=True,
                smoothing=0.05,
            )
            with bar:
                if isinstance(prior, PrecomputedPrior):
                    for start, stop in store.pending_chunks():
                        store.write_chunk(start, prior.read(start, stop))
                        bar.update(stop - start)
                else:
                    assert isinstance(prior, ModelPrior)
                    _run_model(store, dataset, prior, batch_size, workers, device, bar)
        computed = store.rows_done - before
    log(f"{out}: fitting PCA whitening to {dim} of {prior.dim} dimensions")
    # On a GPU the float64 covariance accumulation is far faster there than on the host.
    transport = rk.fit_pca_whitening(rk.EmbeddingStore.open(out), dim, device=device)
    transport.save(out / TRANSPORT_FILE)
    log(f"{out}: wrote {out / TRANSPORT_FILE}")
    return EmbedResult(out, out / TRANSPORT_FILE, n, prior.dim, dim, computed)


def _check_dim(dim: int | None, width: int, n: int) -> int:
    if dim is None:
        # N rows span at most N - 1 centred dimensions: tiny datasets get fewer components.
        dim = max(1, min(DEFAULT_MAX_DIM, width, n - 1))
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if dim > width:
        raise ValueError(f"dim {dim} is larger than the prior's embedding width {width}")
    if dim > n - 1:
        raise ValueError(
            f"dim {dim} needs at least {dim + 1} images (N - 1 >= dim), the dataset has {n}"
        )
    return dim


def _run_model(
    store: rk.EmbeddingStore,
    dataset: ImageFolder,
    prior: ModelPrior,
    batch_size: int,
    workers: int,
    device: torch.device,
    bar: tqdm,
) -> None:
    dataset.transform = prior.transform
    chunks = store.pending_chunks()
    batches = [
        list(range(first, min(first + batch_size, stop)))
        for start, stop in chunks
        for first in range(start, stop, batch_size)
    ]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    chunk_iter = iter(chunks)
    start, stop = next(chunk_iter)
    buffer = np.empty((store.chunk_rows, store.dim), dtype=np.float32)
    for images, indices in loader:
        out = prior.encode(images).cpu().numpy()
        _check_outputs(out, indices, dataset, prior)
        first = int(indices[0])
        buffer[first - start : first - start + len(out)] = out
        bar.update(len(out))
        if first + len(out) == stop:
            store.write_chunk(start, buffer[: stop - start])
            start, stop = next(chunk_iter, (None, None))


def _check_outputs(
    out: np.ndarray, indices: torch.Tensor, dataset: ImageFolder, prior: ModelPrior
) -> None:
    bad = ~(np.isfinite(out) & (np.abs(out) <= _FLOAT16_MAX)).all(axis=1)
    if bad.any():
        row = int(indices[int(np.flatnonzero(bad)[0])])
        raise ValueError(
            f"prior {prior.spec} produced non-finite values or values beyond float16's range "
            f"for image {row} ({dataset.samples[row].path})"
        )
