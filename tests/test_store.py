"""EmbeddingStore: chunked durable writes, resume after SIGKILL, validation of what is on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import rela_kernels as rk
from rela_kernels import store as store_module

N, D, CHUNK = 10 * 64 - 17, 24, 64  # the last chunk is short
IDENTITY = {"fingerprint": "fp-a", "prior": "prior-a", "input_size": 32}


def rows(seed: int, start: int, stop: int) -> np.ndarray:
    """Deterministic synthetic embeddings for rows [start, stop)."""
    rng = np.random.default_rng([seed, start])
    return (rng.standard_normal((stop - start, D)) * 3).astype(np.float32)


def fill(path: Path, seed: int, **identity) -> rk.EmbeddingStore:
    with rk.EmbeddingStore.create_or_resume(
        path, N, D, chunk_rows=CHUNK, **(identity or IDENTITY)
    ) as store:
        for start, stop in store.pending_chunks():
            store.write_chunk(start, rows(seed, start, stop))
    return rk.EmbeddingStore.open(path)


@pytest.fixture
def seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def test_write_read_roundtrip(tmp_path: Path, seed: int) -> None:
    store = fill(tmp_path / "s", seed)
    expected = np.concatenate([rows(seed, s, min(s + CHUNK, N)) for s in range(0, N, CHUNK)])
    expected16 = expected.astype(np.float16)
    assert store.complete and store.rows_done == N and store.shape == (N, D)
    assert not store.writable
    assert np.array_equal(store.array, expected16)
    assert store.array.dtype == np.float16
    raw = np.fromfile(tmp_path / "s" / store_module.DATA, dtype="<f2").reshape(N, D)
    assert np.array_equal(raw, expected16)
    index = torch.tensor([5, 0, N - 1, 5, 300])
    got = store.read(index, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(expected16[index.numpy()]).float())
    assert store.read(np.array([], dtype=np.int64)).shape == (0, D)
    chunks = list(store.iter_chunks(100, start=7, stop=N - 3))
    assert [len(c) for c in chunks][:-1] == [100] * (len(chunks) - 1)
    assert np.array_equal(np.concatenate(chunks), expected16[7 : N - 3])
    manifest = json.loads((tmp_path / "s" / store_module.MANIFEST).read_text())
    assert manifest["rows_done"] == N and manifest["fingerprint"] == "fp-a"
    assert manifest["format_version"] == store_module.FORMAT_VERSION


def test_resume_in_process_continues_at_first_unfinished_chunk(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "s"
    with rk.EmbeddingStore.create_or_resume(path, N, D, chunk_rows=CHUNK, **IDENTITY) as store:
        for start, stop in store.pending_chunks()[:3]:
            store.write_chunk(start, rows(seed, start, stop))
    partial = rk.EmbeddingStore.open(path)
    assert partial.rows_done == 3 * CHUNK and not partial.complete
    assert partial.array.shape == (3 * CHUNK, D)
    with pytest.raises(IndexError, match="192 of 623 rows"):
        partial.read([3 * CHUNK])
    with pytest.raises(ValueError, match="incomplete"):
        rk.fit_pca_whitening(partial, 2)
    # chunk_rows=None adopts the store's own chunk size.
    with rk.EmbeddingStore.create_or_resume(path, N, D, **IDENTITY) as store:
        assert store.chunk_rows == CHUNK
        assert store.pending_chunks()[0] == (3 * CHUNK, 4 * CHUNK)
        assert store.pending_chunks()[-1] == (9 * CHUNK, N)
        for start, stop in store.pending_chunks():
            store.write_chunk(start, rows(seed, start, stop))
    assert np.array_equal(rk.EmbeddingStore.open(path).array, fill(tmp_path / "ref", seed).array)


def test_write_chunk_rejects_bad_chunks(tmp_path: Path, seed: int) -> None:
    with rk.EmbeddingStore.create_or_resume(
        tmp_path / "s", N, D, chunk_rows=CHUNK, **IDENTITY
    ) as store:
        with pytest.raises(ValueError, match="next chunk starts at row 0"):
            store.write_chunk(CHUNK, rows(seed, CHUNK, 2 * CHUNK))
        with pytest.raises(ValueError, match=r"shape \(64, 24\)"):
            store.write_chunk(0, rows(seed, 0, CHUNK - 1))
        bad = rows(seed, 0, CHUNK)
        bad[17, 3] = np.nan
        with pytest.raises(ValueError, match="row 17 has non-finite"):
            store.write_chunk(0, bad)
        bad[17, 3] = 1e6  # finite in float32, inf in float16
        with pytest.raises(ValueError, match="row 17 .*float16"):
            store.write_chunk(0, bad)
        with pytest.raises(TypeError, match="floating point"):
            store.write_chunk(0, np.zeros((CHUNK, D), dtype=np.int32))
        assert store.rows_done == 0
        store.write_chunk(0, torch.from_numpy(rows(seed, 0, CHUNK)))  # tensors work too
        assert store.rows_done == CHUNK
    reader = rk.EmbeddingStore.open(tmp_path / "s")
    with pytest.raises(RuntimeError, match="read-only"):
        reader.write_chunk(CHUNK, rows(seed, CHUNK, 2 * CHUNK))
    with pytest.raises(TypeError, match="integers"):
        reader.read(torch.tensor([0.0]))
    with pytest.raises(IndexError, match="row -1"):
        reader.read([-1])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fingerprint": "fp-b"}, "dataset fingerprint 'fp-a'"),
        ({"prior": "prior-b"}, "prior 'prior-a'"),
        ({"input_size": 64}, "input size 32"),
        ({"n": N + 1}, "row count"),
        ({"dim": D + 1}, "embedding width 24"),
        ({"chunk_rows": CHUNK * 2}, "chunks of 64 rows"),
    ],
)
def test_resume_with_other_dataset_prior_or_shape_fails_and_changes_nothing(
    tmp_path: Path, seed: int, change: dict, message: str
) -> None:
    path = tmp_path / "s"
    fill(path, seed)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    arguments = {"n": N, "dim": D, "chunk_rows": CHUNK, **IDENTITY, **change}
    n, dim = arguments.pop("n"), arguments.pop("dim")
    with pytest.raises(ValueError, match=message):
        rk.EmbeddingStore.create_or_resume(path, n, dim, **arguments)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_open_reports_missing_and_damaged_files(tmp_path: Path, seed: int) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        rk.EmbeddingStore.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        rk.EmbeddingStore.open(tmp_path / "empty")

    path = tmp_path / "s"
    fill(path, seed)
    data = path / store_module.DATA
    manifest = path / store_module.MANIFEST
    good = data.read_bytes()

    with open(data, "r+b") as handle:
        handle.truncate(len(good) - 2)
    with pytest.raises(ValueError, match="truncated: 29902 bytes, expected 29904"):
        rk.EmbeddingStore.open(path)
    # Resuming a store that claims rows never overwrites it, even when damaged.
    with pytest.raises(ValueError, match="truncated"):
        rk.EmbeddingStore.create_or_resume(path, N, D, **IDENTITY)
    assert data.stat().st_size == len(good) - 2
    data.write_bytes(good + b"xx")
    with pytest.raises(ValueError, match="too large"):
        rk.EmbeddingStore.open(path)
    data.unlink()
    with pytest.raises(FileNotFoundError, match=f"{N} rows were written"):
        rk.EmbeddingStore.open(path)
    with pytest.raises(FileNotFoundError, match="embeddings.f16 is missing"):
        rk.EmbeddingStore.create_or_resume(path, N, D, **IDENTITY)
    data.write_bytes(good)

    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        rk.EmbeddingStore.open(path)
    record = json.loads(text)
    manifest.write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        rk.EmbeddingStore.open(path)
    manifest.write_text(json.dumps({**record, "rows_done": 5}))
    with pytest.raises(ValueError, match="inconsistent"):
        rk.EmbeddingStore.open(path)
    del record["prior"]
    manifest.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="missing \\['prior'\\]"):
        rk.EmbeddingStore.open(path)


def test_create_refuses_foreign_directories(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="not an embedding store .* holiday.jpg"):
        rk.EmbeddingStore.create_or_resume(tmp_path / "photos", N, D, **IDENTITY)
    assert sorted(os.listdir(tmp_path / "photos")) == [".lock", "holiday.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        rk.EmbeddingStore.create_or_resume(tmp_path / "file", N, D, **IDENTITY)
    with pytest.raises(ValueError, match="fingerprint must be a non-empty string"):
        rk.EmbeddingStore.create_or_resume(
            tmp_path / "new", N, D, **{**IDENTITY, "fingerprint": ""}
        )
    with pytest.raises(ValueError, match="n must be >= 1"):
        rk.EmbeddingStore.create_or_resume(tmp_path / "new", 0, D, **IDENTITY)


def test_store_without_rows_is_recreated_after_a_kill_during_creation(tmp_path: Path) -> None:
    path = tmp_path / "s"
    rk.EmbeddingStore.create_or_resume(path, N, D, **IDENTITY).close()
    (path / store_module.DATA).unlink()  # as if killed between manifest and data file
    with rk.EmbeddingStore.create_or_resume(path, N, D, **IDENTITY) as store:
        assert store.rows_done == 0
    assert (path / store_module.DATA).stat().st_size == N * D * 2


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with rk.EmbeddingStore.create_or_resume(path, N, D, **IDENTITY):
        with pytest.raises(BlockingIOError, match="another process is writing"):
            rk.EmbeddingStore.create_or_resume(path, N, D, **IDENTITY)
        assert rk.EmbeddingStore.open(path).rows_done == 0  # readers are never blocked
    rk.EmbeddingStore.create_or_resume(path, N, D, **IDENTITY).close()  # lock released


# -------------------------------------------------------------------------------------------------
# SIGKILL mid-run, then resume: byte-identical to an uninterrupted run, nothing recomputed.
# -------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import numpy as np

    from rela_kernels import store as store_module
    from rela_kernels.store import EmbeddingStore

    path, seed, mode, log, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:6]
    N, D, CHUNK = {n}, {d}, {chunk}

    def park():
        Path(ready).write_text("ready")
        time.sleep(120)  # the parent kills us here

    if mode == "inside-commit":
        # Chunk 3's rows reach the disk, then the process dies before the manifest claims them.
        original = store_module._write_manifest

        def commit(target, manifest):
            if manifest["rows_done"] > 3 * CHUNK:
                park()
            original(target, manifest)

        store_module._write_manifest = commit

    store = EmbeddingStore.create_or_resume(
        path, N, D, chunk_rows=CHUNK, fingerprint="fp-a", prior="prior-a", input_size=32
    )
    for start, stop in store.pending_chunks():
        rng = np.random.default_rng([seed, start])
        store.write_chunk(start, (rng.standard_normal((stop - start, D)) * 3).astype(np.float32))
        with open(log, "a") as handle:
            handle.write(f"{{start}}\\n")
        if mode == "between-chunks" and start == 2 * CHUNK:
            park()
    """
).format(n=N, d=D, chunk=CHUNK)


@pytest.mark.parametrize("mode", ["between-chunks", "inside-commit"])
def test_sigkill_then_resume_is_byte_identical_without_recomputation(
    tmp_path: Path, seed: int, mode: str
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path, log, ready = tmp_path / "killed", tmp_path / "log", tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, str(script), str(path), str(seed), mode, str(log), str(ready)]
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, "the child exited before reaching the kill point"
            assert time.monotonic() < deadline, "the child never reached the kill point"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    computed_by_child = [int(line) for line in log.read_text().split()]
    assert computed_by_child == [0, CHUNK, 2 * CHUNK]
    survivor = rk.EmbeddingStore.open(path)
    assert survivor.rows_done == 3 * CHUNK  # the unclaimed chunk 3 is not trusted

    computed_on_resume = []
    with rk.EmbeddingStore.create_or_resume(path, N, D, **IDENTITY) as store:
        for start, stop in store.pending_chunks():
            computed_on_resume.append(start)
            store.write_chunk(start, rows(seed, start, stop))
    assert computed_on_resume == list(range(3 * CHUNK, N, CHUNK))

    reference = fill(tmp_path / "uninterrupted", seed)
    assert (path / store_module.DATA).read_bytes() == (
        tmp_path / "uninterrupted" / store_module.DATA
    ).read_bytes()
    resumed = rk.EmbeddingStore.open(path)
    assert resumed.complete and resumed.rows_done == reference.rows_done
