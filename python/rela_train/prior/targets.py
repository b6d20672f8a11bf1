"""ReLA-D for the trainer: the prior embeddings of the training set and their transport.

Either an existing embedding store is used (``--prior-store DIR``, made by ``rela-train embed``;
``DIR/transport.pt`` is the transport), or the embeddings are computed once into ``RUN/prior``
(``--prior SPEC``) by :mod:`.embedding`: in-memory datasets directly from their tensors
(:func:`.embedding.embed_tensors`), image folders through :func:`.embedding.embed`; the transport
width is :func:`.embedding.transport_width` capped by ``--rela-dim``. A store made for other
data is refused by its fingerprint, and a store whose rows fail their checksums is refused before
any target is made from it. Rows the store marks skipped (unreadable images) make no target: their
per-sample weight is 0 (:meth:`PriorTargets.valid`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import rela_kernels as rk
from rela_train.data.sources import FolderSource, Source, TensorSource
from rela_train.peers import Peers
from rela_train.prior.embedding import (
    TRANSPORT_FILE,
    embed,
    embed_tensors,
    transport_width,
)
from rela_train.prior.loaders import ModelPrior, Prior, load_prior
from rela_train.prior.sharding import report_setup_failure
from rela_train.runtime import DistContext, agree_min

__all__ = [
    "PriorJob",
    "PriorTargets",
    "check_prior_store",
    "embed_with_all_ranks",
    "fit_prior_transport",
    "prepare_prior",
]

# Stores up to this size are held in (device) memory; larger ones are read per batch.
_IN_MEMORY_BYTES = 2 << 30


@dataclass
class PriorTargets:
    """The batch-indexable prior embeddings ``[N, D]`` and the transport to ``d`` dimensions."""

    store: rk.EmbeddingStore
    transport: rk.Transport
    table: torch.Tensor | None  # float16 [N, D] on the device, when it fits
    mask: torch.Tensor | None = None  # bool [N], False for skipped rows; None when none are

    def valid(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """float32 ``[B]``: 1 where the row has a target, 0 for skipped rows; None when the
        store has no skipped rows (so callers need no extra work)."""
        if self.mask is None:
            return None
        return self.mask[indices.cpu()].to(device, torch.float32, non_blocking=True)

    def rows(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.table is not None:
            return self.table[indices.to(self.table.device)]
        return self.store.read(indices).to(device, non_blocking=True)

    @property
    def dim(self) -> int:
        return self.transport.out_dim


def check_prior_store(prior_store: str, source: Source) -> str:
    """What training with ``--prior-store`` checks before it starts (``--dry-run``), except the
    chunk checksums (they read every row; a real start verifies them): a complete store made for
    this training set, with a transport of its width. Returns a one-line description."""
    path = Path(prior_store)
    store = rk.EmbeddingStore.open(path)
    try:
        _check_store(store, source, "--prior-store", verify=False)
        transport = rk.Transport.load(path / TRANSPORT_FILE)
        if transport.in_dim != store.dim:
            raise ValueError(
                f"--prior-store: the transport maps {transport.in_dim}-d embeddings but the store "
                f"at {store.path} holds {store.dim}-d ones"
            )
        size = store.n * store.dim * 2
        return (
            f"{path}: {store.n} x {store.dim} float16 rows ({size / 2**30:.2f} GiB), transport "
            f"{store.dim} -> {transport.out_dim}; checksums verified at start"
        )
    finally:
        store.close()


def _check_store(
    store: rk.EmbeddingStore, source: Source, where: str, *, verify: bool = True
) -> None:
    store.require_complete(where)
    damaged = store.verify() if verify else []
    if damaged:
        shown = ", ".join(f"{a}-{b - 1}" for a, b in damaged[:5])
        raise ValueError(
            f"{where}: the embedding store at {store.path} has {len(damaged)} chunk(s) that fail "
            f"their checksum (rows {shown}); repair it with `rela-train embed --repair` (same "
            "--data-dir, --prior and --out)"
        )
    if store.n != source.n or store.fingerprint != source.fingerprint:
        raise ValueError(
            f"{where}: the embedding store at {store.path} was made for other data "
            f"({store.n} rows, fingerprint {store.fingerprint[:40]}) than the training set "
            f"{source.name} ({source.n} images, fingerprint {source.fingerprint[:40]}); embed this "
            "dataset (same subset) or pass the matching store"
        )


@dataclass(frozen=True)
class PriorJob:
    """The embedding of a training set with a ``--prior`` spec into ``RUN/prior``: what
    :func:`embed_with_all_ranks` shares among the ranks and :func:`prepare_prior` computes alone
    or finds computed. ``dim`` is the transport width asked for (:func:`.embedding.transport_width`
    clips it to what the prior and the rows allow); ``preprocess`` is
    :func:`~rela_train.prior.loaders.load_prior`'s (``--prior-preprocess``)."""

    source: Source
    prior: str
    run_dir: Path
    dim: int
    device: torch.device
    log: Callable[[str], None]
    preprocess: str = "prior"

    @property
    def path(self) -> Path:
        """The store's directory."""
        return self.run_dir / "prior"

    def load(self) -> Prior:
        return load_prior(
            self.prior, device=self.device, num_rows=self.source.n, preprocess=self.preprocess
        )

    def compute(self, loaded: Prior, *, peers: Peers | None = None) -> None:
        """Compute the store's missing chunks with ``loaded`` (a :class:`ModelPrior` for
        in-memory data), every rank of ``peers`` its share. The transport is left to
        :func:`fit_prior_transport`, clipped to the embeddings' usable rank whatever the data;
        ``embed``'s own fit keeps the strict check that ``embed --dim`` needs."""
        source = self.source
        if isinstance(source, FolderSource):
            width = transport_width(self.dim, loaded.dim, source.n)
            embed(
                source.folder.root, loaded, self.path, device=self.device, workers=source.workers,
                dim=width, log=self.log, peers=peers, transport=False,
                progress=peers is None or peers.main,
            )  # fmt: skip
        else:
            assert isinstance(source, TensorSource) and isinstance(loaded, ModelPrior)
            embed_tensors(source, loaded, self.path, log=self.log, peers=peers)


def embed_with_all_ranks(ctx: DistContext, job: PriorJob) -> None:
    """Fill ``RUN/prior`` with the embeddings of ``job``'s source, every rank of ``ctx``
    computing its share of the chunks; :func:`prepare_prior` (on rank 0 first) then finds the
    store complete and fits the transport. Cases :func:`prepare_prior` refuses are left to it."""
    path = job.path
    finished = (
        rk.EmbeddingStore.exists(path)
        and (path / TRANSPORT_FILE).is_file()
        and rk.EmbeddingStore.open(path).complete
    )
    if agree_min(ctx, [int(finished)]) == [1]:
        return  # a resumed run: nothing to embed (prepare_prior still checks the store)
    advice = (
        f"The chunks the ranks finished are kept in {path}; rerun the same `rela-train fit` "
        "command (any number of ranks) to continue embedding from there"
    )
    with Peers(ctx, f"embedding the prior into {path}", advice) as peers:
        try:
            loaded = job.load()
        except BaseException as error:
            report_setup_failure(peers, error)  # the other ranks stop too, with this message
            raise
        source = job.source
        if isinstance(source, FolderSource):
            refused = source.fingerprint != source.folder.fingerprint  # a subset of the folder
        else:
            refused = not (isinstance(source, TensorSource) and isinstance(loaded, ModelPrior))
        if not refused:
            job.compute(loaded, peers=peers)


def fit_prior_transport(
    store: rk.EmbeddingStore,
    width: int,
    path: Path,
    prior: str,
    log: Callable[[str], None],
    *,
    device: torch.device | None = None,
) -> None:
    """The transport of a computed prior, clipped to the embeddings' usable rank with a warning
    when that is below ``width``: a prior no wider than the target width (``--rela-dim-rule
    min-width``) can have fewer non-degenerate principal components than it has dimensions. The
    official code (``_pca_reduce``) whitens those components silently, turning numerical noise
    into unit-variance targets. The float64 covariance is accumulated on ``device`` (None: the
    CPU, as always for in-memory data)."""
    transport = rk.fit_pca_whitening(store, width, device=device, clip_to_rank=True)
    if transport.out_dim < width:
        log(
            f"warning: --prior {prior}: only {transport.out_dim} of the {width} principal "
            f"components requested have non-negligible variance (rank {transport.out_dim}); "
            f"the ReLA targets are clipped to {transport.out_dim} dimensions"
        )
    transport.save(path)


def prepare_prior(
    *,
    source: Source,
    prior: str | None,
    prior_store: str | None,
    run_dir: Path,
    dim: int,
    device: torch.device,
    log: Callable[[str], None],
    preprocess: str = "prior",
) -> PriorTargets:
    """Open or compute the training set's prior embeddings and transport (see module doc).
    ``preprocess`` is :func:`~rela_train.prior.loaders.load_prior`'s (``--prior-preprocess``)."""
    where = "--prior-store" if prior_store is not None else "--prior"
    if prior_store is not None:
        path = Path(prior_store)
        store = rk.EmbeddingStore.open(path)
        _check_store(store, source, where)
        transport = rk.Transport.load(path / TRANSPORT_FILE)
    else:
        assert prior is not None
        job = PriorJob(source, prior, run_dir, dim, device, log, preprocess)
        path = job.path
        transport_path = path / TRANSPORT_FILE
        if isinstance(source, FolderSource):
            if source.fingerprint != source.folder.fingerprint:
                raise ValueError(
                    "--prior: embedding a subset of an image folder is not supported; embed the "
                    "folder with `rela-train embed` and train on the whole folder"
                )
            if not (rk.EmbeddingStore.exists(path) and rk.EmbeddingStore.open(path).complete):
                job.compute(job.load())
            store = rk.EmbeddingStore.open(path)
            _check_store(store, source, where)
            # An image folder's store can be large: accumulate the covariance where it was
            # embedded, as `embed` does.
            fit_device = device
        else:
            assert isinstance(source, TensorSource)
            fit_device = None  # in-memory data: the CPU, as always
            if rk.EmbeddingStore.exists(path) and rk.EmbeddingStore.open(path).complete:
                store = rk.EmbeddingStore.open(path)
                _check_store(store, source, where)
            else:
                # A store left incomplete by a killed run is resumed: create_or_resume checks
                # that it belongs to this data and prior, then only the missing chunks run.
                loaded = job.load()
                if not isinstance(loaded, ModelPrior):
                    raise ValueError(f"--prior: {prior!r} is not a model prior; use --prior-store")
                job.compute(loaded)
                store = rk.EmbeddingStore.open(path)
        if not transport_path.is_file():
            width = transport_width(dim, store.dim, store.n)
            log(f"fitting PCA whitening: {store.dim} -> {width} dimensions")
            fit_prior_transport(store, width, transport_path, prior, log, device=fit_device)
        transport = rk.Transport.load(transport_path)
    if transport.in_dim != store.dim:
        raise ValueError(
            f"{where}: the transport maps {transport.in_dim}-d embeddings but the store at "
            f"{store.path} holds {store.dim}-d ones"
        )
    table = None
    if store.n * store.dim * 2 <= _IN_MEMORY_BYTES:
        table = torch.from_numpy(store.array.copy()).to(device)
    mask = torch.from_numpy(store.valid) if store.skipped else None
    if mask is not None:
        log(f"{where}: {len(store.skipped)} skipped row(s) of the store make no targets")
    return PriorTargets(store, transport.to(device), table, mask)
