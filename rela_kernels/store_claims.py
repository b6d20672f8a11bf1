"""Which chunks an EmbeddingStore's manifest claims, and the manifest that claims more.

The manifest claims the contiguous chunks below ``rows_done`` (their CRCs in ``chunk_checksums``)
and, when several writers finished chunks out of order, the chunks past a gap under
``chunks_ahead`` (each with its CRC and skipped rows). Folding a chunk in moves every chunk the
contiguous prefix reaches out of ``chunks_ahead``; the key is left out when empty, so a finished
store's manifest does not depend on the order its chunks finished in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rela_kernels.store_journal import ChunkRecord

__all__ = ["AHEAD", "ahead_entries_intact", "ahead_records", "prefix_chunks", "with_chunks"]

AHEAD = "chunks_ahead"  # manifest key: finished chunks past rows_done (absent when none)


def prefix_chunks(manifest: Mapping[str, Any]) -> int:
    """Chunks covered by the contiguous ``rows_done``."""
    return -(-manifest["rows_done"] // manifest["chunk_rows"])


def ahead_records(manifest: Mapping[str, Any]) -> dict[int, ChunkRecord]:
    """Finished chunks past ``rows_done`` (entries at or below it are stale and dropped)."""
    first = prefix_chunks(manifest)
    records = (
        ChunkRecord(e["chunk"], e["crc"], tuple((r, w) for r, w in e["skipped"]))
        for e in manifest.get(AHEAD, [])
    )
    return {r.chunk: r for r in records if r.chunk >= first}


def with_chunks(
    manifest: Mapping[str, Any],
    records: Mapping[int, ChunkRecord],
    *,
    format_version: int,
    checksum: str,
) -> dict:
    """``manifest`` claiming ``records`` too (replacing the claims of the same chunks).

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
            first, stop = chunk * step, min((chunk + 1) * step, n)
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
        format_version=format_version,
        checksum=checksum,
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


def ahead_entries_intact(ahead: object, n: int, chunk: int) -> bool:
    """Whether a manifest's ``chunks_ahead`` value is well formed for ``n`` rows in chunks of
    ``chunk`` rows."""
    count = -(-n // chunk)

    def intact(e: object) -> bool:
        if not isinstance(e, dict) or set(e) != {"chunk", "crc", "skipped"}:
            return False
        c, crc, marks = e["chunk"], e["crc"], e["skipped"]
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (c, crc))
        return (
            ints
            and 0 <= c < count
            and isinstance(marks, list)
            and all(
                isinstance(m, list)
                and len(m) == 2
                and isinstance(m[0], int)
                and c * chunk <= m[0] < min((c + 1) * chunk, n)
                for m in marks
            )
        )

    return isinstance(ahead, list) and all(intact(e) for e in ahead)
