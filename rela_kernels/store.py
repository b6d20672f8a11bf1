"""EmbeddingStore: N×D prior embeddings on disk, written in chunks, safe to kill at any moment.

Layout of a store directory::

    manifest.json    what the data is, how much of it is durably written (``rows_done``), a
                     CRC-32 per written chunk, and the rows of skipped (unreadable) inputs
    embeddings.f16   raw row-major little-endian float16, exactly N·D·2 bytes, memory-mappable
    .lock            held (flock) by the one process writing the store

The commit protocol makes a kill harmless: a chunk's rows are written into the data file and
fsynced, and only then is the manifest atomically replaced (write temporary, fsync, rename) with
the larger ``rows_done``. The manifest therefore never claims rows that are not on disk; rows past
``rows_done`` may hold anything and are simply written again on resume. Chunks are fixed-size
and written in order, so a resumed run starts at the first unfinished chunk and recomputes nothing
that was finished.

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
"""

from __future__ import annotations

import errno
import json
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rela_kernels._validation import check_int, check_text
from rela_kernels.atomic_io import atomic_write, fsync_dir

try:
    import fcntl
except ImportError:  # Windows: no flock; the store needs a POSIX system (Linux, macOS)
    fcntl = None  # type: ignore[assignment]

__all__ = ["EmbeddingStore"]

FORMAT = "rela-embedding-store"
FORMAT_VERSION = 2
# Version 1 stores have no checksums and no skipped rows; they are read as unverified.
_READABLE_VERSIONS = (1, 2)
CHECKSUM = "crc32"
MANIFEST = "manifest.json"
DATA = "embeddings.f16"
LOCK = ".lock"
DEFAULT_CHUNK_ROWS = 4096

_DTYPE = np.dtype("<f2")
_WHERE = "rk.EmbeddingStore"
# Fields a resumed run must agree on; anything else in the manifest is informational.
_IDENTITY = ("fingerprint", "prior", "input_size", "n", "dim")


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Atomically replace the manifest (module-level so tests can interpose on the commit)."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


# macOS has no fdatasync; fsync is the (slightly slower) portable equivalent.
_datasync = getattr(os, "fdatasync", os.fsync)


def _check_input_size(value: object) -> int | None:
    if value is None:
        return None
    return check_int(_WHERE, "input_size", value, 1)


class EmbeddingStore:
    """A directory holding N prior embeddings of width D as float16, filled chunk by chunk.

    Create or resume a store with :meth:`create_or_resume` (the writer), open a finished one with
    :meth:`open` (read-only). Read rows with :attr:`array`, :meth:`read` or :meth:`iter_chunks`;
    only the ``rows_done`` rows that are durably written are ever visible.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], *, lock_fd: int | None) -> None:
        # Use create_or_resume() or open(); the constructor trusts a validated manifest.
        self.path = path
        self._manifest = manifest
        self._lock_fd = lock_fd
        self._data_fd: int | None = None
        self._memmap: np.memmap | None = None
        if lock_fd is not None:
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
    ) -> EmbeddingStore:
        """Open ``path`` for writing: a new store, or the unfinished (or finished) one there.

        Args:
            n, dim: rows (dataset size) and embedding width.
            fingerprint: identifies the dataset (file list and sizes).
            prior: identifies the prior model and its preprocessing.
            input_size: image side the prior sees (None when not applicable).
            chunk_rows: rows per chunk; None keeps the existing store's value, or uses 4096 for a
                new one. A resumed store must be given its original value (or None).
            metadata: free-form JSON written into a new store's manifest (not compared on resume).

        Raises:
            ValueError: the existing store was made for another dataset, prior, input size or
                shape, or ``path`` holds something that is not an embedding store. Nothing is
                changed on disk in that case.
            FileNotFoundError: the manifest claims written rows but the data file is gone.
            BlockingIOError: another process is writing this store.
        """
        path = Path(path)
        n = check_int(_WHERE, "n", n, 1)
        dim = check_int(_WHERE, "dim", dim, 1)
        if chunk_rows is not None:
            chunk_rows = check_int(_WHERE, "chunk_rows", chunk_rows, 1)
        wanted = {
            "n": n,
            "dim": dim,
            "fingerprint": check_text(_WHERE, "fingerprint", fingerprint),
            "prior": check_text(_WHERE, "prior", prior),
            "input_size": _check_input_size(input_size),
        }
        if path.exists() and not path.is_dir():
            raise ValueError(f"{_WHERE}: {path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = cls._lock(path)
        try:
            manifest_path = path / MANIFEST
            if manifest_path.exists():
                manifest = cls._read_manifest(path)
                cls._check_identity(path, manifest, wanted)
                if chunk_rows is not None and chunk_rows != manifest["chunk_rows"]:
                    raise ValueError(
                        f"{_WHERE}: the store at {path} is written in chunks of "
                        f"{manifest['chunk_rows']} rows, got chunk_rows={chunk_rows}; pass "
                        "chunk_rows=None to resume it"
                    )
                if manifest["rows_done"] == 0:
                    # Nothing is claimed yet, so a missing or short data file (a kill during
                    # creation) is simply made again.
                    cls._ensure_data_file(path, n * dim * _DTYPE.itemsize)
                else:
                    cls._check_data_file(path, manifest)
            else:
                cls._check_empty(path)
                manifest = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "dtype": "float16",
                    "byte_order": "little",
                    "data_file": DATA,
                    "chunk_rows": chunk_rows or DEFAULT_CHUNK_ROWS,
                    "rows_done": 0,
                    "checksum": CHECKSUM,
                    "chunk_checksums": [],
                    "skipped": [],
                    "metadata": dict(metadata or {}),
                    **wanted,
                }
                # Manifest first (claiming nothing), data file second: whichever moment a kill
                # lands, the next call finds either an empty directory or a rows_done=0 store.
                _write_manifest(manifest_path, manifest)
                cls._ensure_data_file(path, n * dim * _DTYPE.itemsize)
            return cls(path, manifest, lock_fd=lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

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
        manifest = cls._read_manifest(path)
        cls._check_data_file(path, manifest)
        return cls(path, manifest, lock_fd=None)

    # ---------------------------------------------------------------------------------------
    # Properties
    # ---------------------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return self._manifest["n"]

    @property
    def dim(self) -> int:
        return self._manifest["dim"]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    @property
    def fingerprint(self) -> str:
        return self._manifest["fingerprint"]

    @property
    def prior(self) -> str:
        return self._manifest["prior"]

    @property
    def input_size(self) -> int | None:
        return self._manifest["input_size"]

    @property
    def chunk_rows(self) -> int:
        return self._manifest["chunk_rows"]

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
        step = self.chunk_rows
        return [(s, min(s + step, self.n)) for s in range(0, self.rows_done, step)]

    def _checksums(self) -> list[int | None]:
        sums = list(self._manifest.get("chunk_checksums", []))
        return sums + [None] * (len(self._written()) - len(sums))

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
        return damaged

    @property
    def writable(self) -> bool:
        return self._data_fd is not None

    def pending_chunks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every chunk still to write, in the order they must be written."""
        step = self.chunk_rows
        return [(s, min(s + step, self.n)) for s in range(self.rows_done, self.n, step)]

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

    def write_chunk(
        self,
        start: int,
        rows: np.ndarray | torch.Tensor,
        *,
        skipped: Mapping[int, str] | None = None,
    ) -> None:
        """Write the next chunk, rows ``[start, start + len(rows))``, and commit it durably.

        ``start`` must equal :attr:`rows_done` and ``rows`` must be ``[min(chunk_rows,
        n - start), dim]``. Values are converted to float16 and must be finite after conversion
        (so an embedding beyond float16's range, ±65504, is an error rather than a stored inf).
        ``skipped`` maps rows of this chunk (absolute row numbers) to the reason their input was
        unreadable: they are stored as zeros (whatever ``rows`` holds there) and marked invalid.
        """
        self._check_writable()
        if start != self.rows_done:
            raise ValueError(
                f"{_WHERE}.write_chunk: chunks must be written in order; the next chunk starts "
                f"at row {self.rows_done}, got start={start}"
            )
        if self.complete:
            raise ValueError(f"{_WHERE}.write_chunk: the store at {self.path} is already complete")
        self._commit(start, rows, skipped, "write_chunk")

    def rewrite_chunk(
        self,
        start: int,
        rows: np.ndarray | torch.Tensor,
        *,
        skipped: Mapping[int, str] | None = None,
    ) -> None:
        """Replace an already written chunk (a repair of a range :meth:`verify` reported):
        ``start`` must be a chunk boundary below :attr:`rows_done`; otherwise as
        :meth:`write_chunk`. The chunk's checksum and skipped rows are replaced."""
        self._check_writable()
        if start < 0 or start >= self.rows_done or start % self.chunk_rows:
            raise ValueError(
                f"{_WHERE}.rewrite_chunk: start must be the first row of a written chunk "
                f"(a multiple of {self.chunk_rows} below {self.rows_done}), got {start}"
            )
        self._commit(start, rows, skipped, "rewrite_chunk")

    def _check_writable(self) -> None:
        if self._data_fd is None:
            raise RuntimeError(f"{_WHERE}: {self.path} was opened read-only; use create_or_resume")

    def _commit(
        self,
        start: int,
        rows: np.ndarray | torch.Tensor,
        skipped: Mapping[int, str] | None,
        method: str,
    ) -> None:
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
            data = np.array(rows, dtype=_DTYPE, order="C")
        for row in marks:
            data[row - start] = 0  # no meaning: fixed bytes keep the store deterministic
        finite = np.isfinite(data).all(axis=1)
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite)[0])
            raise ValueError(
                f"{where}: row {bad} has non-finite values (or values beyond float16's range "
                "±65504)"
            )
        offset = start * self.dim * _DTYPE.itemsize
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.pwrite(self._data_fd, view[written:], offset + written)
        _datasync(self._data_fd)
        # Only now, with the rows durable, may the manifest claim them.
        chunk = start // self.chunk_rows
        sums = self._checksums() if method == "rewrite_chunk" else self._checksums() + [None]
        sums[chunk] = zlib.crc32(view)
        kept = [[r, why] for r, why in self._manifest.get("skipped", []) if not start <= r < stop]
        manifest = dict(
            self._manifest,
            format_version=FORMAT_VERSION,
            checksum=CHECKSUM,
            chunk_checksums=sums,
            skipped=sorted(kept + [[r, why] for r, why in marks.items()]),
            rows_done=max(self.rows_done, stop),
        )
        _write_manifest(self.path / MANIFEST, manifest)
        self._manifest = manifest
        self._memmap = None

    def close(self) -> None:
        """Release the data file and the writer's lock (reading still works afterwards)."""
        for name in ("_data_fd", "_lock_fd"):
            fd = getattr(self, name)
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
            return np.empty((0, self.dim), dtype=_DTYPE)
        if self._memmap is None:
            self._memmap = np.memmap(
                self.path / DATA, dtype=_DTYPE, mode="r", shape=(self.n, self.dim)
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
        rows = self.array[index] if index.size else np.empty((0, self.dim), dtype=_DTYPE)
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
        row_bytes = self.dim * _DTYPE.itemsize
        with open(self.path / DATA, "rb", buffering=0) as handle:
            for first in range(start, stop, chunk_rows):
                rows = min(chunk_rows, stop - first)
                buffer = np.empty((rows, self.dim), dtype=_DTYPE)
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
    def _lock(path: Path) -> int:
        if fcntl is None:
            raise OSError(errno.ENOSYS, f"{_WHERE}: writing a store needs a POSIX system")
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
        try:
            # Released by the kernel when the holder exits, even on SIGKILL, so a killed run
            # never blocks its own resume.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise BlockingIOError(
                    error.errno, f"{_WHERE}: another process is writing the store at {path}"
                ) from error
            raise
        return fd

    @staticmethod
    def _check_empty(path: Path) -> None:
        """A directory without a manifest must hold nothing but our own leftovers."""
        leftovers = {LOCK, DATA}
        strangers = sorted(
            entry
            for entry in os.listdir(path)
            if entry not in leftovers and not entry.startswith(f".{MANIFEST}.")
        )
        if strangers:
            shown = ", ".join(strangers[:5]) + (" ..." if len(strangers) > 5 else "")
            raise ValueError(
                f"{_WHERE}: {path} is not an embedding store (no {MANIFEST}) and is not empty "
                f"(holds {shown}); choose a new or empty directory"
            )
        if (path / DATA).exists():
            raise ValueError(
                f"{_WHERE}: {path} has {DATA} but no {MANIFEST}; the manifest was removed, so "
                "the rows cannot be trusted. Delete the directory to start over"
            )

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{_WHERE}: no embedding store at {path} ({MANIFEST} is missing)"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{_WHERE}: cannot read {manifest_path}: {error}") from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{_WHERE}: {manifest_path} is not an embedding-store manifest")
        if manifest.get("format_version") not in _READABLE_VERSIONS:
            versions = " and ".join(map(str, _READABLE_VERSIONS))
            raise ValueError(
                f"{_WHERE}: {manifest_path} has format version {manifest.get('format_version')}; "
                f"this rela_kernels reads versions {versions}"
            )
        missing = [
            k for k in ("n", "dim", "chunk_rows", "rows_done", *_IDENTITY) if k not in manifest
        ]
        if missing:
            raise ValueError(f"{_WHERE}: {manifest_path} is damaged (missing {missing})")
        try:
            n, dim = int(manifest["n"]), int(manifest["dim"])
            chunk, done = int(manifest["chunk_rows"]), int(manifest["rows_done"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{_WHERE}: {manifest_path} is damaged ({error})") from error
        if manifest.get("dtype") != "float16" or manifest.get("data_file") != DATA:
            raise ValueError(f"{_WHERE}: {manifest_path} describes an unsupported data file")
        if n < 1 or dim < 1 or chunk < 1 or not 0 <= done <= n or (done % chunk and done != n):
            raise ValueError(
                f"{_WHERE}: {manifest_path} is inconsistent (n={n}, dim={dim}, "
                f"chunk_rows={chunk}, rows_done={done})"
            )
        sums = manifest.get("chunk_checksums", [])
        skipped = manifest.get("skipped", [])
        if (
            not isinstance(sums, list)
            or len(sums) > -(-done // chunk)
            or not all(s is None or (isinstance(s, int) and not isinstance(s, bool)) for s in sums)
            or not isinstance(skipped, list)
            or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and 0 <= e[0] < done
                for e in skipped
            )
        ):
            raise ValueError(
                f"{_WHERE}: {manifest_path} is damaged (bad chunk_checksums or skipped entries)"
            )
        return manifest

    @staticmethod
    def _check_identity(path: Path, manifest: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
        labels = {
            "fingerprint": "dataset fingerprint",
            "prior": "prior",
            "input_size": "input size",
            "n": "row count (dataset size)",
            "dim": "embedding width",
        }
        for key in _IDENTITY:
            if manifest[key] != wanted[key]:
                raise ValueError(
                    f"{_WHERE}: the store at {path} was made with {labels[key]} "
                    f"{manifest[key]!r}, but this run has {wanted[key]!r}; use another output "
                    "directory, or delete this one to start over"
                )

    @staticmethod
    def _check_data_file(path: Path, manifest: Mapping[str, Any]) -> None:
        data = path / DATA
        expected = manifest["n"] * manifest["dim"] * _DTYPE.itemsize
        if not data.is_file():
            raise FileNotFoundError(
                f"{_WHERE}: {data} is missing, but {path / MANIFEST} says "
                f"{manifest['rows_done']} rows were written"
            )
        size = data.stat().st_size
        if size != expected:
            kind = "truncated" if size < expected else "too large"
            raise ValueError(
                f"{_WHERE}: {data} is {kind}: {size} bytes, expected {expected} "
                f"({manifest['n']} x {manifest['dim']} float16)"
            )

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
