"""The store's plumbing written once: StoreSpec, the chunk arithmetic, and the lock file that
names its holder (shared by stores and run directories)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

import rela_kernels as rk
from rela_kernels.holder_lock import HolderLock, LockHeld, make_directory, remove_created
from rela_kernels.store_manifest import chunk_bounds, chunk_count

SPEC = rk.StoreSpec(10, 4, "fingerprint", "prior", 8, chunk_rows=4, metadata={"data": "d"})


def test_a_spec_is_checked_frozen_and_holds_plain_ints() -> None:
    spec = rk.StoreSpec(np.int64(10), np.int32(4), "f", "p", None)
    assert type(spec.n) is int and type(spec.dim) is int and spec.data_bytes == 80
    assert spec.identity == {
        "fingerprint": "f",
        "prior": "p",
        "input_size": None,
        "n": 10,
        "dim": 4,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.n = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        rk.StoreSpec(0, 4, "f", "p", None)
    with pytest.raises(ValueError, match="prior must be a non-empty string"):
        rk.StoreSpec(1, 4, "f", "", None)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        rk.StoreSpec(1, 4, "f", "p", None, chunk_rows=0)


def test_chunk_arithmetic() -> None:
    assert [chunk_count(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert [chunk_bounds(c, 4, 10) for c in range(3)] == [(0, 4), (4, 8), (8, 10)]


def test_lead_with_a_spec_writes_what_create_or_resume_writes(tmp_path: Path) -> None:
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    made = []
    for name, opened in [
        ("a", lambda p: rk.EmbeddingStore.lead(p, SPEC)),
        ("b", lambda p: rk.EmbeddingStore.create_or_resume(
            p, 10, 4, fingerprint="fingerprint", prior="prior", input_size=8, chunk_rows=4,
            metadata={"data": "d"})),
    ]:  # fmt: skip
        with opened(tmp_path / name) as store:
            assert store.chunk_count == 3 and store.chunk_bounds(2) == (8, 10)
            for start, stop in store.pending_chunks():
                store.write_chunk(start, rows[start:stop])
        made.append(
            {p.name: p.read_bytes() for p in (tmp_path / name).iterdir() if p.name != ".lock"}
        )
    assert made[0] == made[1]


def test_a_writer_with_another_chunk_size_cannot_join(tmp_path: Path) -> None:
    with rk.EmbeddingStore.lead(tmp_path / "s", SPEC, job="job") as _:
        other = dataclasses.replace(SPEC, chunk_rows=5)
        with pytest.raises(ValueError, match="chunks of 4 rows, got chunk_rows=5"):
            rk.EmbeddingStore.follow(tmp_path / "s", "job", "rank1", other)
        with rk.EmbeddingStore.follow(tmp_path / "s", "job", "rank1", SPEC) as joined:
            assert joined.pending_chunks() == [(0, 4), (4, 8), (8, 10)]


def test_the_lock_names_its_holder_and_restores_what_it_replaced(tmp_path: Path) -> None:
    file = tmp_path / "x.lock"
    file.write_text("earlier holder\n")
    held = HolderLock.take(file, job="token")
    record = json.loads(file.read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["job"] == "token" and not held.made_file
    with pytest.raises(LockHeld) as refused:
        HolderLock.take(file)  # another open file description: refused like another process
    assert refused.value.holder.startswith(f"pid {os.getpid()} on {socket.gethostname()}")
    held.restore()
    assert file.read_text() == "earlier holder\n" and held.fd is None
    again = HolderLock.take(tmp_path / "new.lock")
    assert again.made_file
    again.release()


def test_the_directories_a_writer_made_are_taken_back_while_empty(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c"
    assert make_directory(path) == tmp_path / "a" and make_directory(path) is None
    (tmp_path / "a" / "keep").write_text("")
    remove_created(path, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep"]
