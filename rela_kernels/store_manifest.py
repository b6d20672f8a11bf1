"""An EmbeddingStore's manifest: what the store holds (:class:`StoreSpec`), the chunk arithmetic,
the manifest a new store starts with, reading and validating one (with the directory's entries
and data file), and the chunks it claims.

The manifest claims the contiguous chunks below ``rows_done`` (their CRCs in ``chunk_checksums``)
and, when several writers finished chunks out of order, the chunks past a gap under
``chunks_ahead`` (each with its CRC and skipped rows). Folding a chunk in moves every chunk the
contiguous prefix reaches out of ``chunks_ahead``; the key is left out when empty, so a finished
store's manifest does not depend on the order its chunks finished in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rela_kernels._validation import check_int, check_text
from rela_kernels.store_journal import ChunkRecord, is_journal
from rela_kernels.store_lock import LOCK, WRITERS

__all__ = [
    "AHEAD",
    "DATA",
    "DEFAULT_CHUNK_ROWS",
    "FORMAT_VERSION",
    "MANIFEST",
    "StoreSpec",
    "ahead_records",
    "check_data_file",
    "check_empty_directory",
    "check_store_entries",
    "chunk_bounds",
    "chunk_count",
    "new_manifest",
    "prefix_chunks",
    "read_manifest",
    "with_chunks",
]

FORMAT = "rela-embedding-store"
FORMAT_VERSION = 2
# Version 1 stores have no checksums and no skipped rows; they are read as unverified.
READABLE_VERSIONS = (1, 2)
CHECKSUM = "crc32"
MANIFEST = "manifest.json"
DATA = "embeddings.f16"
DEFAULT_CHUNK_ROWS = 4096
DTYPE = np.dtype("<f2")
AHEAD = "chunks_ahead"  # manifest key: finished chunks past rows_done (absent when none)

_WHERE = "rk.EmbeddingStore"
# What each identity field is, in the message refusing a store made with another value.
_LABELS = {
    "fingerprint": "dataset fingerprint",
    "prior": "prior",
    "input_size": "input size",
    "n": "row count (dataset size)",
    "dim": "embedding width",
}


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds, checked on construction: ``n`` rows (the dataset's size) of width
    ``dim``, of the dataset ``fingerprint`` through the prior ``prior`` at ``input_size`` (None
    when not applicable). A resumed or joined store must have been made with the same five; the
    layout (``chunk_rows``: None keeps an existing store's, 4096 for a new one) and the free-form
    ``metadata`` of a new store's manifest are not compared."""

    n: int
    dim: int
    fingerprint: str
    prior: str
    input_size: int | None
    chunk_rows: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        def store(name: str, value: Any) -> None:  # once, here: numpy integers become ints
            object.__setattr__(self, name, value)

        store("n", check_int(_WHERE, "n", self.n, 1))
        store("dim", check_int(_WHERE, "dim", self.dim, 1))
        check_text(_WHERE, "fingerprint", self.fingerprint)
        check_text(_WHERE, "prior", self.prior)
        for name in ("input_size", "chunk_rows"):
            if getattr(self, name) is not None:
                store(name, check_int(_WHERE, name, getattr(self, name), 1))
        store("metadata", dict(self.metadata))

    @property
    def identity(self) -> dict[str, Any]:
        """The manifest fields a resumed or joined store must agree on."""
        return {name: getattr(self, name) for name in _LABELS}

    @property
    def data_bytes(self) -> int:
        return self.n * self.dim * DTYPE.itemsize

    def check(self, path: Path, manifest: Mapping[str, Any]) -> None:
        """Refuse the store at ``path`` if its manifest was made for another spec."""
        for key, wanted in self.identity.items():
            if manifest[key] != wanted:
                raise ValueError(
                    f"{_WHERE}: the store at {path} was made with {_LABELS[key]} "
                    f"{manifest[key]!r}, but this run has {wanted!r}; use another output "
                    "directory, or delete this one to start over"
                )
        if self.chunk_rows is not None and self.chunk_rows != manifest["chunk_rows"]:
            raise ValueError(
                f"{_WHERE}: the store at {path} is written in chunks of "
                f"{manifest['chunk_rows']} rows, got chunk_rows={self.chunk_rows}; pass "
                "chunk_rows=None to resume it"
            )


def chunk_count(n: int, chunk_rows: int) -> int:
    """Chunks of ``chunk_rows`` rows that ``n`` rows make (the last one may be shorter)."""
    return -(-n // chunk_rows)


def chunk_bounds(chunk: int, chunk_rows: int, n: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of chunk ``chunk``."""
    return chunk * chunk_rows, min((chunk + 1) * chunk_rows, n)


def new_manifest(spec: StoreSpec) -> dict[str, Any]:
    """The manifest of a new store of ``spec``, claiming nothing."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": "float16",
        "byte_order": "little",
        "data_file": DATA,
        "chunk_rows": spec.chunk_rows or DEFAULT_CHUNK_ROWS,
        "rows_done": 0,
        "checksum": CHECKSUM,
        "chunk_checksums": [],
        "skipped": [],
        "metadata": dict(spec.metadata),
        **spec.identity,
    }


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the store at ``path``, checked: FileNotFoundError when there is none,
    ValueError when it is unreadable, of another format or version, or inconsistent."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{_WHERE}: no embedding store at {path} ({MANIFEST} is missing)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{_WHERE}: cannot read {manifest_path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{_WHERE}: {manifest_path} is not an embedding-store manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        versions = " and ".join(map(str, READABLE_VERSIONS))
        raise ValueError(
            f"{_WHERE}: {manifest_path} has format version {manifest.get('format_version')}; "
            f"this rela_kernels reads versions {versions}"
        )
    missing = [k for k in ("chunk_rows", "rows_done", *_LABELS) if k not in manifest]
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
        or len(sums) > chunk_count(done, chunk)
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
    if not _ahead_entries_intact(manifest.get(AHEAD, []), n, chunk):
        raise ValueError(f"{_WHERE}: {manifest_path} is damaged (bad {AHEAD} entries)")
    return manifest


def check_data_file(path: Path, manifest: Mapping[str, Any]) -> None:
    """The data file the manifest describes is there, at its full size."""
    data = path / DATA
    expected = manifest["n"] * manifest["dim"] * DTYPE.itemsize
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


def check_store_entries(path: Path, companions: Sequence[str]) -> None:
    """Everything in a store directory must be the store's, or a companion the caller named:
    a foreign file there is a sign of a wrong --out (and would be mistaken for ours)."""
    own = {MANIFEST, DATA, LOCK, WRITERS, *companions}
    temporary = tuple(f".{name}." for name in (MANIFEST, *companions))
    strangers = sorted(
        entry
        for entry in os.listdir(path)
        if entry not in own
        and not is_journal(entry)
        and not (entry.startswith(temporary) and entry.endswith(".tmp"))
    )
    if strangers:
        shown = ", ".join(strangers[:5]) + (" ..." if len(strangers) > 5 else "")
        raise ValueError(
            f"{_WHERE}: the store directory {path} holds {shown}, which is not part of an "
            "embedding store; move it out of the directory (or choose another one) and rerun"
        )


def check_empty_directory(path: Path) -> None:
    """A directory without a manifest must hold nothing but our own leftovers."""
    leftovers = {LOCK, DATA, WRITERS}
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


# -- claims ------------------------------------------------------------------------------------


def prefix_chunks(manifest: Mapping[str, Any]) -> int:
    """Chunks covered by the contiguous ``rows_done``."""
    return chunk_count(manifest["rows_done"], manifest["chunk_rows"])


def ahead_records(manifest: Mapping[str, Any]) -> dict[int, ChunkRecord]:
    """Finished chunks past ``rows_done`` (entries at or below it are stale and dropped)."""
    first = prefix_chunks(manifest)
    records = (
        ChunkRecord(e["chunk"], e["crc"], tuple((r, w) for r, w in e["skipped"]))
        for e in manifest.get(AHEAD, [])
    )
    return {r.chunk: r for r in records if r.chunk >= first}


def with_chunks(manifest: Mapping[str, Any], records: Mapping[int, ChunkRecord]) -> dict:
    """``manifest`` claiming ``records`` too (replacing the claims of the same chunks), stamped
    with this version's format and checksum.

    The contiguous prefix grows over every finished chunk it reaches; the rest stay under
    :data:`AHEAD`, which is left out when empty, so the manifest of a finished store does not
    depend on the order its chunks finished in."""
    n, step = manifest["n"], manifest["chunk_rows"]
    prefix = prefix_chunks(manifest)
    sums = list(manifest.get("chunk_checksums", []))
    sums += [None] * (prefix - len(sums))
    skipped = {int(r): str(w) for r, w in manifest.get("skipped", [])}
    ahead = ahead_records(manifest)
    for chunk, record in records.items():
        if chunk < prefix:
            sums[chunk] = record.crc
            first, stop = chunk_bounds(chunk, step, n)
            skipped = {r: w for r, w in skipped.items() if not first <= r < stop}
            skipped.update(record.skipped)
        else:
            ahead[chunk] = record
    while prefix in ahead:
        record = ahead.pop(prefix)
        sums.append(record.crc)
        skipped.update(record.skipped)
        prefix += 1
    result = dict(
        manifest,
        format_version=FORMAT_VERSION,
        checksum=CHECKSUM,
        chunk_checksums=sums,
        skipped=sorted([r, w] for r, w in skipped.items()),
        rows_done=min(prefix * step, n),
    )
    result.pop(AHEAD, None)
    if ahead:
        result[AHEAD] = [
            {"chunk": r.chunk, "crc": r.crc, "skipped": sorted([a, b] for a, b in r.skipped)}
            for r in sorted(ahead.values(), key=lambda r: r.chunk)
        ]
    return result


def _ahead_entries_intact(ahead: object, n: int, chunk: int) -> bool:
    """Whether a manifest's ``chunks_ahead`` value is well formed for ``n`` rows in chunks of
    ``chunk`` rows."""
    count = chunk_count(n, chunk)

    def intact(e: object) -> bool:
        if not isinstance(e, dict) or set(e) != {"chunk", "crc", "skipped"}:
            return False
        c, crc, marks = e["chunk"], e["crc"], e["skipped"]
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (c, crc))
        if not (ints and 0 <= c < count and isinstance(marks, list)):
            return False
        first, stop = chunk_bounds(c, chunk, n)
        return all(
            isinstance(m, list) and len(m) == 2 and isinstance(m[0], int) and first <= m[0] < stop
            for m in marks
        )

    return isinstance(ahead, list) and all(intact(e) for e in ahead)
