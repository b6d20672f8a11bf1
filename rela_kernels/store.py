"""EmbeddingStore: N×D prior embeddings on disk, written in chunks, safe to kill at any moment.

Layout of a store directory::

    manifest.json    what the data is, how much of it is durably written (``rows_done``), a
                     CRC-32 per written chunk, and the rows of skipped (unreadable) inputs
    embeddings.f16   raw row-major little-endian float16, exactly N·D·2 bytes, memory-mappable
    .lock            held (flock) by the one process writing the store (the leader), which
                     records itself there (pid, host, start time, job token)
    .writers         flock shared by the other processes of the leader's job while they write
    .journal-W.jsonl the chunks writer W finished, until the leader folds them into the manifest

The commit protocol makes a kill harmless: a chunk's rows are written into the data file and
fsynced, and only then is the manifest atomically replaced (write temporary, fsync, rename) with
the larger ``rows_done``. The manifest therefore never claims rows that are not on disk; rows past
``rows_done`` may hold anything and are simply written again on resume. Chunks are fixed-size
and a sole writer writes them in order, so a resumed run starts at the first unfinished chunk and
recomputes nothing that was finished.

Integrity: every chunk's CRC-32 (``zlib.crc32`` of its float16 bytes) is committed with the
manifest that claims it. :meth:`EmbeddingStore.verify` rereads the data file and returns the row
ranges of chunks whose bytes no longer match (a zeroed or overwritten region of the file); a
writer repairs them with :meth:`EmbeddingStore.rewrite_chunk`. Stores of format version 1 (made
before checksums existed) still open: their chunks are "unverified" (:attr:`unverified_rows`)
until rewritten.

Skipped rows: a writer may mark rows of a chunk as skipped (``write_chunk(..., skipped={row:
reason})``), e.g. images that cannot be decoded. Their stored values are zeros and carry no
meaning: :attr:`EmbeddingStore.valid` is False there, the transport fits (PCA whitening, least
squares) leave them out, and training gives their targets weight 0. The
skip list is part of the same atomic manifest commit as the rows.

Rows are written with ``os.pwrite`` rather than through a writable memmap: on a full disk a
write to a mapped page kills the process with SIGBUS, whereas ``pwrite`` raises an OSError that
can be reported. Readers map the file read-only (``numpy.memmap``).

Several writers (the ranks of one distributed job): the leader opens the store with
``create_or_resume(..., job=TOKEN)``, which records the job's token with the holder in ``.lock``;
the other processes :meth:`~EmbeddingStore.join` it with the same token (a process that does not
find the token there does not see the leader's directory) and hold a shared ``flock`` on
``.writers`` while they write. Each writer writes only the chunks given to it, each at its own
byte range, and claims each finished chunk in its own journal (:mod:`rela_kernels.store_journal`)
after the rows are durable; the leader alone replaces the manifest, when it folds the journals in
(:meth:`~EmbeddingStore.absorb_journals`, after rereading every journaled chunk and checking its
CRC). Chunks may finish out of order: the manifest lists finished chunks past the contiguous
``rows_done`` under ``chunks_ahead`` until the gap before them is filled, so a finished store's
manifest is the same whichever processes wrote it. A new leader refuses a store while processes
of an earlier job still hold ``.writers``, and absorbs the journals a killed job left behind.
"""

from __future__ import annotations

import errno
import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rela_kernels._validation import check_int
from rela_kernels.atomic_io import atomic_write, fsync_dir
from rela_kernels.holder_lock import make_directory, remove_created
from rela_kernels.store_journal import ChunkRecord, append_record, is_journal, journal_name
from rela_kernels.store_journal import read_records as read_journal
from rela_kernels.store_lock import (
    LOCK,
    WRITERS,
    check_no_writers,
    holder_job,
    take_lock,
    take_writer_lock,
)
from rela_kernels.store_manifest import (
    AHEAD,
    DATA,
    DTYPE,
    FORMAT_VERSION,
    MANIFEST,
    StoreSpec,
    ahead_records,
    check_data_file,
    check_empty_directory,
    check_store_entries,
    chunk_bounds,
    chunk_count,
    new_manifest,
    prefix_chunks,
    read_manifest,
    with_chunks,
)

__all__ = ["DATA", "FORMAT_VERSION", "LOCK", "MANIFEST", "WRITERS", "EmbeddingStore", "StoreSpec"]

_WHERE = "rk.EmbeddingStore"


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Atomically replace the manifest (module-level so tests can interpose on the commit)."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _append_journal(fd: int, record: ChunkRecord) -> None:
    """Claim a durable chunk in a writer's journal (module-level so tests can interpose)."""
    append_record(fd, record)


# macOS has no fdatasync; fsync is the (slightly slower) portable equivalent.
_datasync = getattr(os, "fdatasync", os.fsync)


# A chunk's rows, and its skipped rows with the reasons (absolute row numbers).
Rows = np.ndarray | torch.Tensor
Skipped = Mapping[int, str] | None


def _manifest_field(name: str, doc: str) -> property:
    """A read-only property of an :class:`EmbeddingStore`: its manifest's ``name``."""
    return property(lambda store: store._manifest[name], doc=doc)


class EmbeddingStore:
    """A directory holding N prior embeddings of width D as float16, filled chunk by chunk.

    Create or resume a store with :meth:`create_or_resume` (the writer), open a finished one with
    :meth:`open` (read-only). Read rows with :attr:`array`, :meth:`read` or :meth:`iter_chunks`;
    only the ``rows_done`` rows that are durably written are ever visible.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        *,
        lock_fd: int | None,
        writers_fd: int | None = None,
    ) -> None:
        # Use create_or_resume(), join() or open(); the constructor trusts a validated manifest.
        self.path = path
        self._manifest = manifest
        self._lock_fd = lock_fd  # the leader's exclusive lock on .lock
        self._writers_fd = writers_fd  # a joined writer's shared lock on .writers
        self._data_fd: int | None = None
        self._journal_fd: int | None = None
        self._journaled: dict[int, ChunkRecord] = {}  # chunks this writer claimed in its journal
        self._memmap: np.memmap | None = None
        if lock_fd is not None or writers_fd is not None:
            self._data_fd = os.open(path / DATA, os.O_RDWR)

    # ---------------------------------------------------------------------------------------
    # Construction
    # ---------------------------------------------------------------------------------------

    @classmethod
    def create_or_resume(
        cls,
        path: str | os.PathLike[str],
        n: int,
        dim: int,
        *,
        fingerprint: str,
        prior: str,
        input_size: int | None,
        chunk_rows: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        job: str | None = None,
        companions: Sequence[str] = (),
        on_locked: Callable[[], None] | None = None,
    ) -> EmbeddingStore:
        """Open ``path`` for writing: a new store, or the unfinished (or finished) one there.

        The caller becomes the store's leader: it holds ``.lock`` (which names it), and journals
        left by killed writers are folded into the manifest (:meth:`absorb_journals`).

        Args:
            n, dim, fingerprint, prior, input_size, chunk_rows, metadata: the :class:`StoreSpec`
                (what the store holds; a resumed store must have been made with the same).
            job: a token naming the distributed job this leader belongs to; other processes of
                the job :meth:`join` the store with it.
            companions: names of other files that belong in the store directory (the caller's
                own, e.g. a transport); any other entry there is refused as foreign.
            on_locked: called once the lock is held and names the holder, before anything else
                is created or changed (the job checks that every process sees the directory);
                if it raises, what this call created is removed and the error propagates.

        Raises:
            ValueError: the existing store was made for another dataset, prior, input size or
                shape, or ``path`` holds something that is not an embedding store or a file
                that does not belong to it. Nothing is changed on disk in that case.
            FileNotFoundError: the manifest claims written rows but the data file is gone.
            BlockingIOError: another process is writing this store (the message names it), or
                writers of an earlier job still are.
        """
        spec = StoreSpec(n, dim, fingerprint, prior, input_size, chunk_rows, metadata or {})
        return cls.lead(path, spec, job=job, companions=companions, on_locked=on_locked)

    @classmethod
    def lead(
        cls,
        path: str | os.PathLike[str],
        spec: StoreSpec,
        *,
        job: str | None = None,
        companions: Sequence[str] = (),
        on_locked: Callable[[], None] | None = None,
    ) -> EmbeddingStore:
        """:meth:`create_or_resume` with the store described by ``spec``."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"{_WHERE}: {path} exists and is not a directory")
        created = make_directory(path)
        try:
            lock = take_lock(path, job)
        except BaseException:
            remove_created(path, created)
            raise
        try:
            if on_locked is not None:
                on_locked()
        except BaseException:
            lock.restore()
            if lock.made_file:
                lock.file.unlink(missing_ok=True)
            remove_created(path, created)
            raise
        try:
            if (path / MANIFEST).exists():
                manifest = cls._resume(path, spec, companions)
            else:
                manifest = cls._create(path, spec)
            store = cls(path, manifest, lock_fd=lock.fd)
        except BaseException:
            # A refused start leaves the directory as it found it, holder record included.
            lock.restore()
            raise
        try:
            store.absorb_journals()  # what writers of a killed job finished is kept
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _resume(cls, path: Path, spec: StoreSpec, companions: Sequence[str]) -> dict[str, Any]:
        """The manifest of the store at ``path``, checked to be ``spec``'s and free to lead."""
        manifest = read_manifest(path)
        spec.check(path, manifest)
        check_store_entries(path, companions)
        check_no_writers(path)
        if manifest["rows_done"] == 0 and not manifest.get(AHEAD):
            # Nothing is claimed yet, so a missing or short data file (a kill during
            # creation) is simply made again.
            cls._ensure_data_file(path, spec.data_bytes)
        else:
            check_data_file(path, manifest)
        return manifest

    @classmethod
    def _create(cls, path: Path, spec: StoreSpec) -> dict[str, Any]:
        """A new store of ``spec`` in the (empty) directory ``path``; its manifest."""
        check_empty_directory(path)
        manifest = new_manifest(spec)
        # Manifest first (claiming nothing), data file second: whichever moment a kill lands,
        # the next call finds either an empty directory or a rows_done=0 store.
        _write_manifest(path / MANIFEST, manifest)
        cls._ensure_data_file(path, spec.data_bytes)
        return manifest

    @classmethod
    def join(
        cls,
        path: str | os.PathLike[str],
        job: str,
        writer: str,
        **spec: Any,
    ) -> EmbeddingStore:
        """Open the store that the leader of job ``job`` holds, as one more writer of it; ``spec``
        are :class:`StoreSpec`'s fields, by name (its ``metadata`` is not used).

        The writer claims the chunks it writes in its own journal (named by ``writer``), never in
        the manifest; it holds a shared lock on ``.writers`` until :meth:`close`, so that no new
        leader takes over the store while it may still write.

        Raises:
            ValueError: ``path`` is not the directory the leader locked for ``job`` (it is not
                shared with the leader), or the store there was made for other data or another
                prior.
        """
        return cls.follow(path, job, writer, StoreSpec(**spec))

    @classmethod
    def follow(
        cls, path: str | os.PathLike[str], job: str, writer: str, spec: StoreSpec
    ) -> EmbeddingStore:
        """:meth:`join` the store described by ``spec``."""
        path = Path(path)
        name = journal_name(writer)
        if cls.holder_job(path) != job:
            raise ValueError(cls.not_shared_message(path, job))
        writers_fd = take_writer_lock(path)
        try:
            # Checked again under the lock: a leader of another job that took the store over in
            # between has written its own token by now (see store_lock.check_no_writers).
            if cls.holder_job(path) != job:
                raise ValueError(cls.not_shared_message(path, job))
            manifest = read_manifest(path)
            spec.check(path, manifest)
            check_data_file(path, manifest)
            store = cls(path, manifest, lock_fd=None, writers_fd=writers_fd)
        except BaseException:
            os.close(writers_fd)
            raise
        store.journal_to(writer, name)
        return store

    @staticmethod
    def holder_job(path: str | os.PathLike[str]) -> str | None:
        """The job token the current (or last) leader of the store at ``path`` recorded."""
        return holder_job(Path(path))

    @staticmethod
    def not_shared_message(path: Path, job: str) -> str:
        return (
            f"{_WHERE}: {path} is not the store directory the job's leader locked (job {job} is "
            "not recorded in its .lock): the directory is not shared by every process; put it on "
            "a file system that all nodes mount, at a path every node can reach"
        )

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` holds a store (a manifest), finished or not."""
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> EmbeddingStore:
        """Open an existing store read-only (finished or not; see :attr:`complete`).

        Raises:
            FileNotFoundError: no store at ``path`` (directory, manifest or data file missing).
            ValueError: the manifest is unreadable or the data file has the wrong size.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{_WHERE}: no embedding store at {path} (not a directory)")
        manifest = read_manifest(path)
        check_data_file(path, manifest)
        return cls(path, manifest, lock_fd=None)

    # ---------------------------------------------------------------------------------------
    # Properties
    # ---------------------------------------------------------------------------------------

    n = _manifest_field("n", "Rows of the store (the dataset's size).")
    dim = _manifest_field("dim", "Width of each row.")
    fingerprint = _manifest_field("fingerprint", "The dataset's fingerprint.")
    prior = _manifest_field("prior", "The prior's identity.")
    input_size = _manifest_field("input_size", "The image side the prior saw (None: any).")
    chunk_rows = _manifest_field("chunk_rows", "Rows per chunk (the last may be shorter).")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._manifest.get("metadata", {}))

    @property
    def rows_done(self) -> int:
        """Rows durably written; always a multiple of ``chunk_rows``, or ``n``."""
        return self._manifest["rows_done"]

    @property
    def complete(self) -> bool:
        return self.rows_done == self.n

    @property
    def skipped(self) -> dict[int, str]:
        """Rows marked skipped by the writer (input could not be read), with the reason."""
        return {int(row): str(reason) for row, reason in self._manifest.get("skipped", [])}

    @property
    def valid(self) -> np.ndarray:
        """bool ``[n]``: True for written rows that are not skipped (the rows targets come from)."""
        mask = np.zeros(self.n, dtype=bool)
        mask[: self.rows_done] = True
        rows = list(self.skipped)
        if rows:
            mask[rows] = False
        return mask

    @property
    def unverified_rows(self) -> int:
        """Written rows without a checksum (chunks written by a store of format version 1)."""
        pairs = zip(self._written(), self._checksums(), strict=True)
        return sum(stop - start for (start, stop), crc in pairs if crc is None)

    def _written(self) -> list[tuple[int, int]]:
        return [self.chunk_bounds(c) for c in range(prefix_chunks(self._manifest))]

    def _checksums(self) -> list[int | None]:
        sums = list(self._manifest.get("chunk_checksums", []))
        return sums + [None] * (len(self._written()) - len(sums))

    @property
    def chunk_count(self) -> int:
        """Chunks the store is written in (the last one may be shorter)."""
        return chunk_count(self.n, self.chunk_rows)

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """``(start, stop)``: the rows of chunk ``chunk``."""
        return chunk_bounds(chunk, self.chunk_rows, self.n)

    def _claims(self) -> dict[int, int | None]:
        """Every chunk the manifest (or this writer's journal) claims, with its checksum."""
        claims: dict[int, int | None] = dict(enumerate(self._checksums()))
        claims.update((c, r.crc) for c, r in ahead_records(self._manifest).items())
        claims.update((c, r.crc) for c, r in self._journaled.items())
        return claims

    @property
    def chunks_ahead(self) -> int:
        """Finished chunks past :attr:`rows_done` (left by several writers; see the module doc)."""
        return len(ahead_records(self._manifest))

    def verify(self) -> list[tuple[int, int]]:
        """Reread every written chunk and compare it with its checksum.

        Returns the ``(start, stop)`` row ranges of damaged chunks, in order (empty when the
        store is intact). Chunks without a checksum (:attr:`unverified_rows`) cannot be checked
        and are not reported.
        """
        damaged = []
        sums = self._checksums()
        chunks = self.iter_chunks(self.chunk_rows) if self.rows_done else iter(())
        for (start, stop), expected, rows in zip(self._written(), sums, chunks, strict=True):
            if expected is not None and zlib.crc32(memoryview(rows).cast("B")) != expected:
                damaged.append((start, stop))
        ahead = ahead_records(self._manifest)
        if ahead:
            fd = os.open(self.path / DATA, os.O_RDONLY)
            try:
                for chunk, record in sorted(ahead.items()):
                    if self._crc_on_disk(fd, chunk) != record.crc:
                        damaged.append(self.chunk_bounds(chunk))
            finally:
                os.close(fd)
        return damaged

    def _crc_on_disk(self, fd: int, chunk: int) -> int | None:
        """CRC-32 of chunk ``chunk``'s bytes as the file holds them now (None: file too short)."""
        start, stop = self.chunk_bounds(chunk)
        row_bytes = self.dim * DTYPE.itemsize
        offset, size = start * row_bytes, (stop - start) * row_bytes
        if hasattr(os, "posix_fadvise"):
            # Drop cached pages first: on a network file system they may predate another
            # node's write, and a claim must rest on what the server holds.
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        data = bytearray()
        while len(data) < size:
            part = os.pread(fd, size - len(data), offset + len(data))
            if not part:
                return None
            data += part
        return zlib.crc32(data)

    @property
    def writable(self) -> bool:
        return self._data_fd is not None

    def pending_chunks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every chunk still to write, in the order a sole writer writes
        them: those neither the manifest nor this writer's journal claims."""
        claimed = self._claims()
        first = len(self._written())
        return [self.chunk_bounds(c) for c in range(first, self.chunk_count) if c not in claimed]

    def require_complete(self, where: str = _WHERE) -> None:
        if not self.complete:
            raise ValueError(
                f"{where}: the embedding store at {self.path} is incomplete "
                f"({self.rows_done} of {self.n} rows written); finish it first (rerun the embed "
                "job, which resumes)"
            )

    # ---------------------------------------------------------------------------------------
    # Writing
    # ---------------------------------------------------------------------------------------

    def write_chunk(self, start: int, rows: Rows, *, skipped: Skipped = None) -> None:
        """Write the next chunk, rows ``[start, start + len(rows))``, and commit it durably.

        ``start`` must be the first row of the first of :meth:`pending_chunks` (a sole writer
        writes in order; a writer that keeps a journal, of any pending chunk) and ``rows`` must
        be ``[min(chunk_rows, n - start), dim]``. Values are converted to float16 and must be
        finite after conversion (so an embedding beyond float16's range, ±65504, is an error
        rather than a stored inf).
        ``skipped`` maps rows of this chunk (absolute row numbers) to the reason their input was
        unreadable: they are stored as zeros (whatever ``rows`` holds there) and marked invalid.
        """
        self._check_writable()
        pending = self.pending_chunks()
        if not pending:
            raise ValueError(f"{_WHERE}.write_chunk: the store at {self.path} is already complete")
        if self._journal_fd is not None:
            # One of several writers: any chunk nobody claimed yet (the job shares them out).
            if start not in {first for first, _ in pending}:
                raise ValueError(
                    f"{_WHERE}.write_chunk: row {start} does not start a chunk still to write"
                )
        elif start != pending[0][0]:
            raise ValueError(
                f"{_WHERE}.write_chunk: chunks must be written in order; the next chunk starts "
                f"at row {pending[0][0]}, got start={start}"
            )
        self._commit(start, rows, skipped, "write_chunk")

    def rewrite_chunk(self, start: int, rows: Rows, *, skipped: Skipped = None) -> None:
        """Replace an already written chunk (a repair of a range :meth:`verify` reported):
        ``start`` must be a chunk boundary below :attr:`rows_done`; otherwise as
        :meth:`write_chunk`. The chunk's checksum and skipped rows are replaced."""
        self._check_writable()
        if self._journal_fd is not None:
            raise RuntimeError(f"{_WHERE}.rewrite_chunk: only a sole writer repairs chunks")
        if start < 0 or start % self.chunk_rows or start // self.chunk_rows not in self._claims():
            raise ValueError(
                f"{_WHERE}.rewrite_chunk: start must be the first row of a written chunk "
                f"(a multiple of {self.chunk_rows} below {self.rows_done}), got {start}"
            )
        self._commit(start, rows, skipped, "rewrite_chunk")

    def _check_writable(self) -> None:
        if self._data_fd is None:
            raise RuntimeError(f"{_WHERE}: {self.path} was opened read-only; use create_or_resume")

    def _commit(self, start: int, rows: Rows, skipped: Skipped, method: str) -> None:
        where = f"{_WHERE}.{method}"
        expected = (min(self.chunk_rows, self.n - start), self.dim)
        stop = start + expected[0]
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.asarray(rows)
        if rows.shape != expected:
            raise ValueError(
                f"{where}: the chunk at row {start} must have shape {expected}, got {rows.shape}"
            )
        if rows.dtype.kind != "f":
            raise TypeError(f"{where}: rows must be floating point, got {rows.dtype}")
        marks = {}
        for row, reason in (skipped or {}).items():
            if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
                raise TypeError(f"{where}: skipped rows must be ints, got {row!r}")
            if not start <= row < stop:
                raise ValueError(
                    f"{where}: skipped row {row} is outside this chunk (rows {start}..{stop - 1})"
                )
            marks[int(row)] = str(reason)
        with np.errstate(over="ignore"):
            data = np.array(rows, dtype=DTYPE, order="C")
        for row in marks:
            data[row - start] = 0  # no meaning: fixed bytes keep the store deterministic
        finite = np.isfinite(data).all(axis=1)
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite)[0])
            raise ValueError(
                f"{where}: row {bad} has non-finite values (or values beyond float16's range "
                "±65504)"
            )
        offset = start * self.dim * DTYPE.itemsize
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.pwrite(self._data_fd, view[written:], offset + written)
        _datasync(self._data_fd)
        # Only now, with the rows durable, may the manifest or a journal claim them.
        marked = tuple(sorted(marks.items()))
        record = ChunkRecord(start // self.chunk_rows, zlib.crc32(view), marked)
        if self._journal_fd is not None:
            _append_journal(self._journal_fd, record)
            self._journaled[record.chunk] = record
            return
        manifest = with_chunks(self._manifest, {record.chunk: record})
        _write_manifest(self.path / MANIFEST, manifest)
        self._manifest = manifest
        self._memmap = None

    # ---------------------------------------------------------------------------------------
    # Several writers
    # ---------------------------------------------------------------------------------------

    def journal_to(self, writer: str, name: str | None = None) -> None:
        """Claim the chunks this process writes from now on in its journal ``writer`` instead of
        the manifest (the leader does so while other processes write; see the module doc)."""
        self._check_writable()
        name = name or journal_name(writer)
        if self._journal_fd is not None:
            raise RuntimeError(f"{_WHERE}: {self.path}: this writer already keeps a journal")
        self._journal_fd = os.open(
            self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666
        )  # less the umask
        fsync_dir(self.path)

    def absorb_journals(self) -> list[tuple[int, int]]:
        """Fold every journal in the directory into the manifest, then remove the journals.

        Only the leader may (the lock holder), and only while no other process writes: at the
        start of a job and after all its writers have closed. A journaled chunk is claimed only
        if its bytes on disk match the journaled CRC; one that does not (rows not durable, or
        stale on a network file system) stays pending and is computed again. Returns the row
        ranges newly claimed. The manifest is durable before any journal is removed, so a kill
        at any point leaves every claim either in the manifest or still in its journal.
        """
        if self._lock_fd is None:
            raise RuntimeError(f"{_WHERE}: only the store's leader absorbs journals")
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        check_no_writers(self.path)
        names = sorted(entry for entry in os.listdir(self.path) if is_journal(entry))
        if not names:
            self._journaled = {}
            return []
        claimed = set(self._claims()) - set(self._journaled)  # the manifest's own claims
        found: dict[int, ChunkRecord] = {}
        fd = os.open(self.path / DATA, os.O_RDONLY)
        try:
            for name in names:
                for record in read_journal(self.path / name):
                    first, stop = self.chunk_bounds(record.chunk)
                    if (
                        record.chunk >= self.chunk_count
                        or record.chunk in claimed
                        or not all(first <= row < stop for row, _ in record.skipped)
                        or self._crc_on_disk(fd, record.chunk) != record.crc
                    ):
                        continue
                    found[record.chunk] = record
        finally:
            os.close(fd)
        if found:
            manifest = with_chunks(self._manifest, found)
            _write_manifest(self.path / MANIFEST, manifest)
            self._manifest = manifest
            self._memmap = None
        for name in names:
            (self.path / name).unlink(missing_ok=True)
        fsync_dir(self.path)
        self._journaled = {}
        return [self.chunk_bounds(chunk) for chunk in sorted(found)]

    def close(self) -> None:
        """Release the data file and the writer's lock (reading still works afterwards)."""
        for name in ("_journal_fd", "_data_fd", "_writers_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------------------------------
    # Reading
    # ---------------------------------------------------------------------------------------

    @property
    def array(self) -> np.ndarray:
        """The written rows ``[rows_done, dim]`` as a read-only float16 memmap view."""
        if self.rows_done == 0:
            return np.empty((0, self.dim), dtype=DTYPE)
        if self._memmap is None:
            self._memmap = np.memmap(
                self.path / DATA, dtype=DTYPE, mode="r", shape=(self.n, self.dim)
            )
        return self._memmap[: self.rows_done]

    def read(
        self,
        indices: torch.Tensor | np.ndarray | Sequence[int],
        dtype: torch.dtype = torch.float16,
    ) -> torch.Tensor:
        """Rows ``indices`` (any order, repeats allowed) as a ``[len(indices), dim]`` tensor."""
        if isinstance(indices, torch.Tensor):
            if indices.is_floating_point() or indices.dtype == torch.bool:
                raise TypeError(f"{_WHERE}.read: indices must be integers, got {indices.dtype}")
            indices = indices.detach().cpu().numpy()
        index = np.asarray(indices)
        if index.ndim != 1:
            raise ValueError(f"{_WHERE}.read: indices must be 1-D, got shape {index.shape}")
        if index.size and index.dtype.kind not in "iu":
            raise TypeError(f"{_WHERE}.read: indices must be integers, got {index.dtype}")
        index = index.astype(np.int64, copy=False)
        if index.size and (index.min() < 0 or index.max() >= self.rows_done):
            bad = int(index[(index < 0) | (index >= self.rows_done)][0])
            raise IndexError(
                f"{_WHERE}.read: row {bad} is out of range; {self.rows_done} of {self.n} rows "
                "are written"
            )
        rows = self.array[index] if index.size else np.empty((0, self.dim), dtype=DTYPE)
        return torch.from_numpy(np.ascontiguousarray(rows)).to(dtype)

    def iter_chunks(
        self, chunk_rows: int = 65536, *, start: int = 0, stop: int | None = None
    ) -> Iterator[np.ndarray]:
        """Written rows ``[start, stop)`` as consecutive float16 arrays of ``chunk_rows`` rows.

        Each chunk is read into its own buffer (not a memmap view), so streaming over a store much
        larger than memory keeps the process's resident memory at about one chunk.
        """
        chunk_rows = check_int(_WHERE, "chunk_rows", chunk_rows, 1)
        stop = self.rows_done if stop is None else stop
        if not 0 <= start <= stop <= self.rows_done:
            raise ValueError(
                f"{_WHERE}.iter_chunks: need 0 <= start <= stop <= rows_done={self.rows_done}, "
                f"got start={start}, stop={stop}"
            )
        row_bytes = self.dim * DTYPE.itemsize
        with open(self.path / DATA, "rb", buffering=0) as handle:
            for first in range(start, stop, chunk_rows):
                rows = min(chunk_rows, stop - first)
                buffer = np.empty((rows, self.dim), dtype=DTYPE)
                view = memoryview(buffer).cast("B")
                handle.seek(first * row_bytes)
                got = 0
                while got < len(view):
                    count = handle.readinto(view[got:])
                    if not count:
                        raise ValueError(f"{_WHERE}: {self.path / DATA} ended early (truncated?)")
                    got += count
                yield buffer

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.path)!r}, n={self.n}, dim={self.dim}, "
            f"rows_done={self.rows_done}, prior={self.prior!r})"
        )

    # ---------------------------------------------------------------------------------------
    # Checks
    # ---------------------------------------------------------------------------------------

    @staticmethod
    def _ensure_data_file(path: Path, size: int) -> None:
        data = path / DATA
        if data.is_file() and data.stat().st_size == size:
            return
        fd = os.open(data, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
        try:
            os.ftruncate(fd, 0)
            try:
                # Reserve the blocks now: a store that cannot fit fails here, not hours later.
                os.posix_fallocate(fd, 0, size)
            except AttributeError:  # macOS has no posix_fallocate: a sparse file
                os.ftruncate(fd, size)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise OSError(
                        error.errno, f"not enough disk space for {data} ({size} bytes)"
                    ) from error
                os.ftruncate(fd, size)  # file system without fallocate: a sparse file
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path)
