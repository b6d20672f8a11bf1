"""EmbeddingStore with several writers: joined writers claim chunks in journals, the leader alone
writes the manifest, and only claims whose bytes are durable and intact ever reach it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import rela_kernels as rk
from rela_kernels import store as store_module
from rela_kernels.store_journal import ChunkRecord, append_record

N, D, CHUNK = 7 * 16 - 5, 12, 16  # 7 chunks, the last one short
IDENTITY = {"fingerprint": "fp", "prior": "p", "input_size": None}


@pytest.fixture
def seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def rows(seed: int, start: int, stop: int) -> np.ndarray:
    return np.random.default_rng([seed, start]).standard_normal((stop - start, D)).astype("f4")


def bounds(chunk: int) -> tuple[int, int]:
    return chunk * CHUNK, min((chunk + 1) * CHUNK, N)


def write(store: rk.EmbeddingStore, seed: int, chunk: int) -> None:
    start, stop = bounds(chunk)
    store.write_chunk(start, rows(seed, start, stop), skipped={start + 1: "unreadable"})


def sequential(path: Path, seed: int) -> Path:
    with rk.EmbeddingStore.create_or_resume(path, N, D, chunk_rows=CHUNK, **IDENTITY) as store:
        for start, _ in store.pending_chunks():
            write(store, seed, start // CHUNK)
    return path


def lead(path: Path, job: str = "job-a") -> rk.EmbeddingStore:
    return rk.EmbeddingStore.create_or_resume(path, N, D, chunk_rows=CHUNK, job=job, **IDENTITY)


def join(path: Path, writer: str, job: str = "job-a") -> rk.EmbeddingStore:
    return rk.EmbeddingStore.join(path, job, writer, n=N, dim=D, **IDENTITY)


def files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in (store_module.DATA, store_module.MANIFEST)}


def test_writers_in_any_order_give_the_sequential_bytes(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "shared"
    leader = lead(path)
    leader.journal_to("rank0")
    member = join(path, "rank1")
    for chunk in (6, 1, 3):
        write(member, seed, chunk)
    for chunk in (2, 0):
        write(leader, seed, chunk)
    assert rk.EmbeddingStore.open(path).rows_done == 0  # claims are in journals only
    with pytest.raises(BlockingIOError, match="processes of an earlier job still write"):
        leader.absorb_journals()  # the member may still write: nothing is merged
    member.close()
    claimed = leader.absorb_journals()
    assert claimed == [bounds(c) for c in (0, 1, 2, 3, 6)]
    store = rk.EmbeddingStore.open(path)
    assert store.rows_done == 4 * CHUNK and store.chunks_ahead == 1
    assert leader.pending_chunks() == [bounds(4), bounds(5)]
    for chunk in (4, 5):
        write(leader, seed, chunk)
    leader.close()
    assert not any(p.name.startswith(".journal-") for p in path.iterdir())
    assert files(path) == files(sequential(tmp_path / "sequential", seed))
    assert "chunks_ahead" not in json.loads((path / store_module.MANIFEST).read_text())


def test_only_durable_intact_claims_reach_the_manifest(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "s"
    leader = lead(path)
    leader.journal_to("rank0")
    member = join(path, "rank1")
    write(member, seed, 1)
    write(member, seed, 4)
    member.close()
    journal = path / ".journal-rank1.jsonl"
    # A claim whose rows never reached the file, and a line torn by a kill.
    with open(journal, "ab") as handle:
        append_record(handle.fileno(), ChunkRecord(5, 12345))
        handle.write(b'{"check": 1, "record": "{\\"chunk\\": 2')
    # Chunk 4's bytes damaged after its claim was journaled: its claim no longer verifies.
    start, _ = bounds(4)
    with open(path / store_module.DATA, "r+b") as handle:
        handle.seek(start * D * 2)
        handle.write(b"\0" * 8)
    assert leader.absorb_journals() == [bounds(1)]
    assert leader.pending_chunks() == [bounds(c) for c in (0, 2, 3, 4, 5, 6)]
    leader.close()
    manifest = json.loads((path / store_module.MANIFEST).read_text())
    assert manifest["rows_done"] == 0 and [e["chunk"] for e in manifest["chunks_ahead"]] == [1]
    assert manifest["chunks_ahead"][0]["skipped"] == [[bounds(1)[0] + 1, "unreadable"]]


def test_a_resume_absorbs_what_a_killed_job_left_and_verifies_chunks_ahead(
    tmp_path: Path, seed: int
) -> None:
    path = tmp_path / "s"
    leader = lead(path)
    leader.journal_to("rank0")
    member = join(path, "rank1")
    write(leader, seed, 0)
    write(member, seed, 3)
    member.close()
    leader.close()  # both "killed": the journals stay, the manifest claims nothing
    with lead(path, job="job-b") as resumed:  # another job, one process
        assert resumed.rows_done == CHUNK and resumed.chunks_ahead == 1
        assert resumed.pending_chunks() == [bounds(c) for c in (1, 2, 4, 5, 6)]
        assert resumed.verify() == []
    start, _ = bounds(3)
    with open(path / store_module.DATA, "r+b") as handle:
        handle.seek(start * D * 2 + 6)
        handle.write(b"\xff\x7f")
    assert rk.EmbeddingStore.open(path).verify() == [bounds(3)]


def test_join_needs_the_leaders_directory_and_token(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with lead(path):
        with pytest.raises(ValueError, match="not shared by every process"):
            join(path, "rank1", job="another-job")
        with pytest.raises(ValueError, match="not shared by every process"):
            join(tmp_path / "elsewhere", "rank1")
        with pytest.raises(ValueError, match="journal writer names"):
            join(path, "../x")
        with pytest.raises(BlockingIOError, match=r"\(pid \d+ on .*, started "):
            lead(path, job="job-b")
    (path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds notes.txt, which is not part of an embedding"):
        lead(path)
