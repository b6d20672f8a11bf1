"""The embed job: run a prior over an image folder once, store the embeddings, fit the transport.

``embed(data, prior, out)`` fills the EmbeddingStore at ``out`` chunk by chunk (resuming where a
previous run stopped) and then writes ``out/transport.pt``, the PCA-whitening transport whose
outputs are ReLA-D's regression targets.

Unreadable images (decode errors, truncated files, decompression bombs; see
:mod:`rela_train.data.images`) do not stop the job: each is logged, its row is stored as zeros and
marked skipped in the store's manifest with the file and the reason, and no target is made from it
(the transport fit leaves it out; training gives it weight 0). The store stays resumable. Keep
such files where they are: the store is tied to the folder's exact file list (its fingerprint), so
deleting or replacing a file afterwards makes the store refuse the folder with a message saying
so (embed the changed folder into a new directory).

Every written chunk carries a checksum. A rerun (resume) verifies all written rows first and stops
with the damaged row ranges if any chunk's bytes changed; ``repair=True`` (``embed --repair``)
recomputes only those chunks. :func:`verify_store` (``embed --verify``) only checks.

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
from rela_train.prior.loaders import ModelPrior, PrecomputedPrior, Prior, load_prior
from rela_train.runtime import resolve_device

__all__ = [
    "DEFAULT_MAX_DIM",
    "TRANSPORT_FILE",
    "EmbedResult",
    "VerifyResult",
    "embed",
    "resolve_device",
    "verify_store",
]

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
    skipped_rows: int = 0  # rows of unreadable images (listed in the store's manifest)
    repaired_rows: int = 0  # rows of damaged chunks recomputed by this call


@dataclass(frozen=True)
class VerifyResult:
    store: Path
    rows_done: int
    rows: int
    damaged: list[tuple[int, int]]  # (start, stop) row ranges failing their checksum
    unverified_rows: int  # rows without a checksum (store made before checksums existed)
    skipped_rows: int

    @property
    def ok(self) -> bool:
        return not self.damaged

    def summary(self) -> str:
        """One line: what was checked and what is damaged."""
        head = f"{self.store}: {self.rows_done} of {self.rows} rows written"
        notes = []
        if self.skipped_rows:
            notes.append(f"{self.skipped_rows} skipped (unreadable images)")
        if self.unverified_rows:
            notes.append(
                f"{self.unverified_rows} unverified (written before checksums existed; "
                "`embed --repair` does not recompute them, a new store would checksum them)"
            )
        if self.damaged:
            rows = sum(stop - start for start, stop in self.damaged)
            shown = ", ".join(f"{a}-{b - 1}" for a, b in self.damaged[:5])
            more = f" and {len(self.damaged) - 5} more" if len(self.damaged) > 5 else ""
            notes.insert(
                0,
                f"DAMAGED: {rows} rows in {len(self.damaged)} chunk(s) fail their checksum "
                f"(rows {shown}{more}); rerun embed with --repair to recompute them",
            )
        else:
            notes.insert(0, "checksums OK")
        return f"{head}; " + "; ".join(notes)


def verify_store(out: str | os.PathLike[str]) -> VerifyResult:
    """Check every written chunk of the store at ``out`` against its checksum (read-only)."""
    store = rk.EmbeddingStore.open(out)
    return VerifyResult(
        Path(out),
        store.rows_done,
        store.n,
        store.verify(),
        store.unverified_rows,
        len(store.skipped),
    )


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
    repair: bool = False,
    log: Callable[[str], None] = _log,
) -> EmbedResult:
    """Embed every image under ``data`` with ``prior`` into the store ``out``; fit the transport.

    Args:
        data: image folder (see :mod:`rela_train.data.folder`).
        prior: a spec string (see :mod:`rela_train.prior.loaders`) or a loaded :class:`Prior`.
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
        repair: recompute the chunks of an existing store that fail their checksum (without it,
            damaged chunks are an error).

    Raises:
        ValueError / FileNotFoundError: bad arguments or inputs, found before anything is written;
            a store whose written rows fail their checksum (without ``repair``).
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
    wanted_dim = dim
    dim = _check_dim(dim, prior.dim, n)
    out = Path(out)
    _check_same_folder(out, dataset, data)
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
        damaged = store.verify() if before else []
        if damaged and not repair:
            raise ValueError(
                verify_result_line(out, store, damaged)
                + "; nothing was changed (rerun with --repair to recompute only those chunks)"
            )
        if store.unverified_rows:
            log(
                f"{out}: note: {store.unverified_rows} rows were written before stores kept "
                "checksums and cannot be verified"
            )
        repaired = sum(stop - start for start, stop in damaged)
        if damaged:
            log(f"{out}: recomputing {repaired} damaged rows in {len(damaged)} chunk(s)")
            _compute(store, damaged, store.rewrite_chunk, dataset, prior, batch_size, workers,
                     device, None, log)  # fmt: skip
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
                _compute(store, store.pending_chunks(), store.write_chunk, dataset, prior,
                         batch_size, workers, device, bar, log)  # fmt: skip
        computed = store.rows_done - before
        skipped = len(store.skipped)
        if skipped:
            log(
                f"{out}: {skipped} unreadable image(s) skipped; their rows are marked in "
                f"{out / 'manifest.json'} and make no targets"
            )
    if wanted_dim is None and skipped:
        dim = _check_dim(None, prior.dim, n - skipped)  # the fit sees only the valid rows
    log(f"{out}: fitting PCA whitening to {dim} of {prior.dim} dimensions")
    # On a GPU the float64 covariance accumulation is far faster there than on the host.
    transport = rk.fit_pca_whitening(rk.EmbeddingStore.open(out), dim, device=device)
    transport.save(out / TRANSPORT_FILE)
    log(f"{out}: wrote {out / TRANSPORT_FILE}")
    return EmbedResult(out, out / TRANSPORT_FILE, n, prior.dim, dim, computed, skipped, repaired)


def verify_result_line(out: Path, store: rk.EmbeddingStore, damaged: list[tuple[int, int]]) -> str:
    return VerifyResult(
        out, store.rows_done, store.n, damaged, store.unverified_rows, len(store.skipped)
    ).summary()


def _check_same_folder(out: Path, dataset: ImageFolder, data: str | os.PathLike[str]) -> None:
    """A store is tied to its folder's exact file list; say plainly when the folder changed."""
    if not rk.EmbeddingStore.exists(out):
        return
    try:
        store = rk.EmbeddingStore.open(out)
    except (ValueError, FileNotFoundError):
        return  # create_or_resume reports a damaged store in its own words
    if store.fingerprint == dataset.fingerprint or store.metadata.get("data") is None:
        return
    if store.metadata["data"] != str(Path(data).resolve()):
        return  # another folder: create_or_resume's identity message fits
    kept = (
        f"; its {len(store.skipped)} skipped image(s) already make no targets, so unreadable "
        "files can stay in place"
        if store.skipped
        else ""
    )
    raise ValueError(
        f"the image folder {data} changed since the store at {out} was made ({store.n} images "
        f"then, {len(dataset)} now: a file was added, removed, renamed or replaced){kept}. "
        f"Restore the folder as it was to resume or use this store, or embed the changed folder "
        "into a new --out directory"
    )


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


def _compute(
    store: rk.EmbeddingStore,
    chunks: list[tuple[int, int]],
    write: Callable[..., None],
    dataset: ImageFolder,
    prior: Prior,
    batch_size: int,
    workers: int,
    device: torch.device,
    bar: tqdm | None,
    log: Callable[[str], None],
) -> None:
    """Compute ``chunks`` (whole store chunks, in order) and hand each to ``write``."""
    if not chunks:
        return
    if isinstance(prior, PrecomputedPrior):
        for start, stop in chunks:
            write(start, prior.read(start, stop))
            if bar is not None:
                bar.update(stop - start)
        return
    assert isinstance(prior, ModelPrior)
    _run_model(store, chunks, write, dataset, prior, batch_size, workers, device, bar, log)


class _Readable(torch.utils.data.Dataset):
    """Item ``i``: ``(image tensor or None, i, reason)``; unreadable files do not raise."""

    def __init__(self, folder: ImageFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        return self.folder.read(index)


def _collate(items):
    good = [(image, index) for image, index, _ in items if image is not None]
    bad = [(index, reason) for image, index, reason in items if image is None]
    images = torch.stack([image for image, _ in good]) if good else None
    indices = torch.tensor([index for _, index in good], dtype=torch.int64)
    return images, indices, bad


def _run_model(
    store: rk.EmbeddingStore,
    chunks: list[tuple[int, int]],
    write: Callable[..., None],
    dataset: ImageFolder,
    prior: ModelPrior,
    batch_size: int,
    workers: int,
    device: torch.device,
    bar: tqdm | None,
    log: Callable[[str], None],
) -> None:
    dataset.transform = prior.transform
    batches = [
        list(range(first, min(first + batch_size, stop)))
        for start, stop in chunks
        for first in range(start, stop, batch_size)
    ]
    loader = torch.utils.data.DataLoader(
        _Readable(dataset),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    chunk_iter = iter(chunks)
    start, stop = next(chunk_iter)
    buffer = np.zeros((store.chunk_rows, store.dim), dtype=np.float32)
    skipped: dict[int, str] = {}
    for (images, indices, bad), rows in zip(loader, batches, strict=True):
        for index, reason in bad:
            log(f"warning: skipping unreadable image ({reason})")
            skipped[index] = reason
            buffer[index - start] = 0.0
        if images is not None:
            out = prior.encode(images).cpu().numpy()
            _check_outputs(out, indices, dataset, prior)
            buffer[indices.numpy() - start] = out
        if bar is not None:
            bar.update(len(rows))
        if rows[-1] + 1 == stop:
            write(start, buffer[: stop - start], skipped=skipped)
            skipped = {}
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
