"""Embedding a dataset into a store and fitting its transport: the one place that does both.

``embed(data, prior, out)`` (the ``embed`` command) fills the EmbeddingStore at ``out`` from an
image folder chunk by chunk (resuming where a previous run stopped) and then writes
``out/transport.pt``, the PCA-whitening transport whose outputs are ReLA-D's regression targets.
``embed_tensors(source, prior, out)`` fills a store from an in-memory dataset (Fashion-MNIST,
synthetic) for the trainer. Both feed the same chunk loop (:func:`write_embeddings`) from their own
batch producer (:func:`folder_batches`, :func:`tensor_batches`); the transport width of both
follows :func:`transport_width`, and :func:`fit_transport` fits and saves the transport.

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

Given ``peers`` with several ranks (``torchrun ... embed``, ``fit --prior`` under torchrun), every
rank computes its share of the pending chunks into the same store (:mod:`.sharding`); the store's
bytes are the same as with one process, and rank 0 alone fits the transport.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import rela_kernels as rk
from rela_train.data.folder import ImageFolder
from rela_train.data.sources import TensorSource
from rela_train.peers import Peers
from rela_train.prior.loaders import ModelPrior, PrecomputedPrior, Prior, load_prior
from rela_train.prior.sharding import fill_sharded, report_setup_failure
from rela_train.runtime import resolve_device

__all__ = [
    "DEFAULT_MAX_DIM",
    "TRANSPORT_FILE",
    "EmbedBatch",
    "EmbedResult",
    "VerifyResult",
    "default_chunk_rows",
    "embed",
    "embed_tensors",
    "fit_transport",
    "folder_batches",
    "resolve_device",
    "tensor_batches",
    "transport_width",
    "verify_store",
    "write_embeddings",
]

TRANSPORT_FILE = "transport.pt"
DEFAULT_MAX_DIM = 256
_TARGET_CHUNK_ROWS = 4096
# A new store's default chunks are small enough for this many of them, so that up to as many
# ranks get work (the default never depends on the number of ranks: the bytes must not).
_TARGET_CHUNKS = 64
_TENSOR_BATCH_ROWS = 512  # in-memory images per forward pass
_TENSOR_CHUNK_BATCHES = 8  # forward passes per durable chunk of an in-memory dataset's store
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
    seconds: float = 0.0  # time this process spent computing its rows (its share, on a rank)


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


def default_chunk_rows(n: int, batch_size: int) -> int:
    """A new store's rows per chunk: whole batches, about 4096 rows, fewer for a dataset under
    ``64 * 4096`` images so that it still has about 64 chunks to share among ranks."""
    most = max(1, _TARGET_CHUNK_ROWS // batch_size)
    wanted = -(-n // (_TARGET_CHUNKS * batch_size))
    return batch_size * min(most, max(1, wanted))


def transport_width(cap: int, prior_dim: int, rows: int) -> int:
    """The transport width: ``min(cap, D, N - 1)``, at least 1.

    ``N`` rows span at most ``N - 1`` centred directions, so tiny datasets get fewer components.
    ``fit`` caps with ``--rela-dim``; ``embed`` with ``--dim`` (checked, never clamped) or
    :data:`DEFAULT_MAX_DIM`.
    """
    return max(1, min(cap, prior_dim, rows - 1))


def fit_transport(
    store: rk.EmbeddingStore, width: int, *, device: torch.device | None = None
) -> Path:
    """Fit the PCA-whitening transport of ``store``'s valid rows to ``width`` dimensions and save
    it next to the store (``TRANSPORT_FILE``); returns its path.

    ``device`` is where the float64 covariance is accumulated: ``embed`` passes its device (on a
    GPU that is much faster than the host), the trainer passes None for in-memory datasets (the
    CPU). On CUDA the two can differ in the last bits, so each caller keeps its choice.
    """
    path = store.path / TRANSPORT_FILE
    rk.fit_pca_whitening(store, width, device=device).save(path)
    return path


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
    peers: Peers | None = None,
    transport: bool = True,
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
        chunk_rows: rows per durable chunk of a new store (default
            :func:`default_chunk_rows`); a resumed store keeps its own.
        input_size, normalize: override the prior's preprocessing (spec strings only).
        progress: show a progress bar (images/s, ETA) on stderr.
        repair: recompute the chunks of an existing store that fail their checksum (without it,
            damaged chunks are an error).
        peers: the ranks of a distributed job: each computes its share of the chunks (module
            doc); rank 0 fits the transport. None: this process alone.
        transport: fit and save the transport once the store is complete.

    Raises:
        ValueError / FileNotFoundError: bad arguments or inputs, found before anything is written;
            a store whose written rows fail their checksum (without ``repair``).
    """
    try:
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
            raise ValueError(
                f"prior {prior.spec}: {prior.rows} rows, but the dataset has {n} images"
            )
        wanted_dim = dim
        dim = _check_width(dim, prior.dim, n)
        out = Path(out)
        _check_same_folder(out, dataset, data)
    except BaseException as error:
        if peers is not None:
            report_setup_failure(peers, error)  # the other ranks stop too, with this message
        raise
    asked_chunk_rows = chunk_rows
    if chunk_rows is None and not rk.EmbeddingStore.exists(out):
        chunk_rows = default_chunk_rows(n, batch_size)
    metadata = {
        "data": str(Path(data).resolve()),
        "prior_spec": prior.spec,
        "classes": len(dataset.classes),
    }
    spec = rk.StoreSpec(
        n, prior.dim, dataset.fingerprint, prior.identity, prior.input_size, chunk_rows, metadata
    )

    def check_and_repair(store: rk.EmbeddingStore) -> int:
        damaged = store.verify() if store.rows_done or store.chunks_ahead else []
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
        return repaired

    if peers is not None and peers.world > 1:
        shown = {
            "--data": (dataset.fingerprint, str(data)),
            "--prior": (prior.identity, prior.spec),
            "--batch-size": (str(batch_size), str(batch_size)),
            "--chunk-rows": (str(asked_chunk_rows), str(asked_chunk_rows)),
            "--dim": (str(wanted_dim), str(wanted_dim)),
            "--repair": (str(repair), str(repair)),
        }
        log(
            f"{out}: rank {peers.rank} of {peers.world} embedding {n} images with "
            f"{prior.identity} (D={prior.dim})"
        )
        shard = fill_sharded(
            peers,
            out,
            identity=shown,
            spec=spec,
            compute=lambda store, chunks, write, bar: _compute(
                store, chunks, write, dataset, prior, batch_size, workers, device, bar, log
            ),
            prepare=check_and_repair,
            companions=(TRANSPORT_FILE,),
            progress=lambda rows: tqdm(
                total=rows,
                unit="img",
                desc=f"embed rank {peers.rank}",
                disable=not progress,
                dynamic_ncols=True,
                smoothing=0.05,
            ),  # fmt: skip
            log=log,
        )
        store = rk.EmbeddingStore.open(out)
        skipped = len(store.skipped)
        if wanted_dim is None and skipped:
            dim = _check_width(None, prior.dim, n - skipped)
        if transport and peers.main:
            log(f"{out}: fitting PCA whitening to {dim} of {prior.dim} dimensions")
            fit_transport(store, dim, device=device)
            log(f"{out}: wrote {out / TRANSPORT_FILE}")
        return EmbedResult(
            out, out / TRANSPORT_FILE, n, prior.dim, dim, shard.computed_rows, skipped,
            shard.repaired_rows, shard.seconds,
        )  # fmt: skip

    with rk.EmbeddingStore.lead(out, spec, companions=(TRANSPORT_FILE,)) as store:
        repaired = check_and_repair(store)
        todo = store.pending_chunks()
        computed = sum(stop - start for start, stop in todo)
        started = time.perf_counter()
        if store.complete:
            log(f"{out}: all {n} embeddings already stored")
        else:
            verb = f"resuming at row {todo[0][0]}" if computed < n else "starting"
            log(f"{out}: embedding {n} images with {prior.identity} (D={prior.dim}), {verb}")
            bar = tqdm(
                total=n,
                initial=n - computed,
                unit="img",
                desc="embed",
                disable=not progress,
                dynamic_ncols=True,
                smoothing=0.05,
            )
            with bar:
                _compute(store, todo, store.write_chunk, dataset, prior,
                         batch_size, workers, device, bar, log)  # fmt: skip
        seconds = time.perf_counter() - started
        skipped = len(store.skipped)
        if skipped:
            log(
                f"{out}: {skipped} unreadable image(s) skipped; their rows are marked in "
                f"{out / 'manifest.json'} and make no targets"
            )
    if wanted_dim is None and skipped:
        dim = _check_width(None, prior.dim, n - skipped)  # the fit sees only the valid rows
    if transport:
        log(f"{out}: fitting PCA whitening to {dim} of {prior.dim} dimensions")
        fit_transport(rk.EmbeddingStore.open(out), dim, device=device)
        log(f"{out}: wrote {out / TRANSPORT_FILE}")
    return EmbedResult(
        out, out / TRANSPORT_FILE, n, prior.dim, dim, computed, skipped, repaired, seconds
    )


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


def _check_width(dim: int | None, width: int, n: int) -> int:
    """``embed``'s transport width: ``transport_width(DEFAULT_MAX_DIM, D, N)`` by default; an
    explicit ``dim`` must fit ``[1, min(D, N - 1)]`` (an argument error, never clamped)."""
    if dim is None:
        dim = transport_width(DEFAULT_MAX_DIM, width, n)
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
    batches = folder_batches(dataset, prior, chunks, batch_size, workers, device)
    write_embeddings(
        store, chunks, write, prior, batches, lambda row: str(dataset.samples[row].path), bar, log
    )


class EmbedBatch(NamedTuple):
    """One forward pass: the store rows it covers, the images that could be read and their rows,
    and ``(row, reason)`` for those that could not."""

    rows: Sequence[int]
    images: torch.Tensor | None
    indices: np.ndarray
    skipped: list[tuple[int, str]]


def write_embeddings(
    store: rk.EmbeddingStore,
    chunks: list[tuple[int, int]],
    write: Callable[..., None],
    prior: ModelPrior,
    batches: Iterator[EmbedBatch],
    describe: Callable[[int], str],
    bar: tqdm | None = None,
    log: Callable[[str], None] = _log,
) -> None:
    """The chunk loop: encode each batch, collect whole chunks, hand each to ``write``.

    ``batches`` cover ``chunks`` in order and never straddle a chunk boundary (so a resumed store
    is computed by the same batches as an uninterrupted one). Every output row is checked before
    it is stored; ``describe(row)`` names the input in the error. Unreadable inputs are logged
    and handed to ``write`` as skipped rows.
    """
    chunk_iter = iter(chunks)
    start, stop = next(chunk_iter)
    buffer = np.zeros((store.chunk_rows, store.dim), dtype=np.float32)
    skipped: dict[int, str] = {}
    for batch in batches:
        for index, reason in batch.skipped:
            log(f"warning: skipping unreadable image ({reason})")
            skipped[index] = reason
            buffer[index - start] = 0.0
        if batch.images is not None:
            out = prior.encode(batch.images).cpu().numpy()
            _check_outputs(out, batch.indices, prior, describe)
            buffer[batch.indices - start] = out
        if bar is not None:
            bar.update(len(batch.rows))
        if batch.rows[-1] + 1 == stop:
            write(start, buffer[: stop - start], skipped=skipped)
            skipped = {}
            start, stop = next(chunk_iter, (None, None))


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


def folder_batches(
    dataset: ImageFolder,
    prior: ModelPrior,
    chunks: list[tuple[int, int]],
    batch_size: int,
    workers: int,
    device: torch.device,
) -> Iterator[EmbedBatch]:
    """Batches of ``batch_size`` images of ``chunks``, decoded with the prior's evaluation
    preprocessing by ``workers`` DataLoader processes; unreadable files become skipped rows."""
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
    for (images, indices, bad), rows in zip(loader, batches, strict=True):
        yield EmbedBatch(rows, images, indices.numpy(), bad)


def tensor_batches(
    source: TensorSource,
    prior: ModelPrior,
    chunks: list[tuple[int, int]],
    batch_size: int = _TENSOR_BATCH_ROWS,
) -> Iterator[EmbedBatch]:
    """Batches of ``batch_size`` in-memory images of ``chunks``, preprocessed a chunk at a time:
    uint8 to [0, 1], gray to RGB, resized (bilinear, antialiased; no crop) to the prior's input
    size, normalised with the prior's mean and std."""
    size = prior.input_size
    mean = torch.tensor(prior.transform.mean).view(1, 3, 1, 1)
    std = torch.tensor(prior.transform.std).view(1, 3, 1, 1)
    for start, stop in chunks:
        x = source.images[start:stop].to(torch.float32) / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # gray -> RGB, as PIL's convert("RGB") does
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        x = (x - mean) / std
        for first in range(0, len(x), batch_size):
            rows = range(start + first, start + min(first + batch_size, len(x)))
            indices = np.arange(rows.start, rows.stop)
            yield EmbedBatch(rows, x[first : first + batch_size], indices, [])


def embed_tensors(
    source: TensorSource,
    prior: ModelPrior,
    out: str | os.PathLike[str],
    *,
    batch_size: int = _TENSOR_BATCH_ROWS,
    log: Callable[[str], None] = _log,
    peers: Peers | None = None,
) -> rk.EmbeddingStore:
    """Embed an in-memory dataset with ``prior`` into the store ``out`` (created, or resumed
    when a killed run left it incomplete); returns the finished store, opened read-only.

    Chunks hold ``batch_size * 8`` rows; the store's metadata names the source and the prior spec.
    With ``peers`` of several ranks, each computes its share of the chunks (module doc).
    """
    log(f"embedding {source.n} images with {prior.identity} (D={prior.dim})")
    spec = rk.StoreSpec(
        source.n, prior.dim, source.fingerprint, prior.identity, prior.input_size,
        chunk_rows=batch_size * _TENSOR_CHUNK_BATCHES,
        metadata={"data": source.name, "prior_spec": prior.spec},
    )  # fmt: skip

    def compute(store, chunks, write, bar) -> None:
        if chunks:
            batches = tensor_batches(source, prior, chunks, batch_size)
            write_embeddings(
                store, chunks, write, prior, batches, lambda row: source.name, bar, log
            )

    if peers is not None and peers.world > 1:
        identity = {
            "--data": (source.fingerprint, source.name),
            "--prior": (prior.identity, prior.spec),
        }
        fill_sharded(
            peers, Path(out), identity=identity, spec=spec, compute=compute,
            companions=(TRANSPORT_FILE,), log=log,
        )  # fmt: skip
        return rk.EmbeddingStore.open(out)
    with rk.EmbeddingStore.lead(out, spec, companions=(TRANSPORT_FILE,)) as store:
        compute(store, store.pending_chunks(), store.write_chunk, None)
    return rk.EmbeddingStore.open(out)


def _check_outputs(
    out: np.ndarray, indices: np.ndarray, prior: ModelPrior, describe: Callable[[int], str]
) -> None:
    bad = ~(np.isfinite(out) & (np.abs(out) <= _FLOAT16_MAX)).all(axis=1)
    if bad.any():
        row = int(indices[int(np.flatnonzero(bad)[0])])
        raise ValueError(
            f"prior {prior.spec} produced non-finite values or values beyond float16's range "
            f"for image {row} ({describe(row)})"
        )
