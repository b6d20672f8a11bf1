"""Per-writer journals: how a process that does not own an EmbeddingStore's manifest claims a chunk.

When several processes fill one store (the ranks of a distributed ``embed``), only one of them,
the leader, ever replaces the manifest. Every writer, the leader included while others write,
records each chunk it finished in its own journal file ``.journal-<writer>.jsonl`` in the store
directory, one line per chunk, appended and fsynced only after the chunk's rows are durable. The
leader folds the journals into the manifest (see ``EmbeddingStore.absorb_journals``).

A line carries the chunk index, the CRC-32 of the chunk's float16 bytes and the chunk's skipped
rows, wrapped with the CRC-32 of its own text: a line torn by a kill or a crash, or damaged
later, fails that check and reads as absent, so the chunk is simply computed again.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ChunkRecord", "append_record", "is_journal", "journal_name", "read_records"]

_PREFIX = ".journal-"
_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class ChunkRecord:
    """One finished chunk: its index, the CRC-32 of its bytes, its skipped rows with reasons."""

    chunk: int
    crc: int
    skipped: tuple[tuple[int, str], ...] = ()


def journal_name(writer: str) -> str:
    """The journal file of ``writer`` (letters, digits, ``-`` and ``_`` only)."""
    if not writer or not all(c.isalnum() or c in "-_" for c in writer):
        raise ValueError(f"journal writer names use letters, digits, - and _; got {writer!r}")
    return f"{_PREFIX}{writer}{_SUFFIX}"


def is_journal(name: str) -> bool:
    return name.startswith(_PREFIX) and name.endswith(_SUFFIX)


def _encode(record: ChunkRecord) -> bytes:
    body = json.dumps(
        {"chunk": record.chunk, "crc": record.crc, "skipped": [list(s) for s in record.skipped]},
        sort_keys=True,
        separators=(",", ":"),
    )
    line = json.dumps({"check": zlib.crc32(body.encode("utf-8")), "record": body})
    return (line + "\n").encode("utf-8")


def append_record(fd: int, record: ChunkRecord) -> None:
    """Append ``record`` to the journal open at ``fd`` (O_APPEND) and make it durable."""
    data = memoryview(_encode(record))
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])
    os.fsync(fd)


def _decode(line: bytes) -> ChunkRecord | None:
    try:
        outer = json.loads(line.decode("utf-8"))
        body = outer["record"]
        if not isinstance(body, str) or zlib.crc32(body.encode("utf-8")) != outer["check"]:
            return None
        inner = json.loads(body)
        chunk, crc, skipped = inner["chunk"], inner["crc"], inner["skipped"]
        marks = tuple((int(row), str(why)) for row, why in skipped)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (chunk, crc)):
        return None
    return ChunkRecord(chunk, crc, marks)


def read_records(path: Path) -> list[ChunkRecord]:
    """The intact records of the journal at ``path``, in the order they were appended; torn or
    damaged lines are left out."""
    records = []
    for line in path.read_bytes().split(b"\n"):
        record = _decode(line) if line.strip() else None
        if record is not None:
            records.append(record)
    return records
