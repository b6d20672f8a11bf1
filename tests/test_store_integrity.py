"""Embedding-store integrity: per-chunk checksums, verify(), repair of only the damaged chunks,
skipped rows, stores written before checksums existed, and `embed --verify` / `--repair`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folder import make_image_folder
from rela_train.cli import main
from rela_train.prior.embedding import embed

import rela_kernels as rk
from rela_kernels import store as store_module

N, DIM, CHUNK = 23, 5, 4


def make_store(path: Path, generator: torch.Generator, skipped=None) -> np.ndarray:
    rows = torch.randn(N, DIM, generator=generator).numpy()
    store = rk.EmbeddingStore.create_or_resume(
        path, N, DIM, fingerprint="fp", prior="test", input_size=None, chunk_rows=CHUNK
    )
    with store:
        for start, stop in store.pending_chunks():
            marks = {r: f"row {r} unreadable" for r in (skipped or []) if start <= r < stop}
            store.write_chunk(start, rows[start:stop], skipped=marks)
    return rows


def zero_bytes(path: Path, row_from: int, row_to: int) -> None:
    """Overwrite rows [row_from, row_to) of the data file with zeros in place."""
    with open(path / store_module.DATA, "r+b") as handle:
        handle.seek(row_from * DIM * 2)
        handle.write(b"\0" * ((row_to - row_from) * DIM * 2))


def test_verify_finds_exactly_the_damaged_chunks(tmp_path: Path, generator: torch.Generator):
    make_store(tmp_path / "s", generator)
    store = rk.EmbeddingStore.open(tmp_path / "s")
    assert store.verify() == [] and store.unverified_rows == 0
    manifest = json.loads((tmp_path / "s" / store_module.MANIFEST).read_text())
    assert manifest["checksum"] == "crc32" and len(manifest["chunk_checksums"]) == 6
    zero_bytes(tmp_path / "s", 5, 9)  # rows 5..8: chunks 4..7 and 8..11
    zero_bytes(tmp_path / "s", 22, 23)  # the last, short chunk 20..22
    assert rk.EmbeddingStore.open(tmp_path / "s").verify() == [(4, 8), (8, 12), (20, 23)]


def test_rewrite_chunk_repairs_and_keeps_the_rest(tmp_path: Path, generator: torch.Generator):
    rows = make_store(tmp_path / "s", generator)
    before = (tmp_path / "s" / store_module.DATA).read_bytes()
    zero_bytes(tmp_path / "s", 12, 14)
    with rk.EmbeddingStore.create_or_resume(
        tmp_path / "s", N, DIM, fingerprint="fp", prior="test", input_size=None
    ) as store:
        assert store.verify() == [(12, 16)]
        with pytest.raises(ValueError, match="first row of a written chunk"):
            store.rewrite_chunk(13, rows[13:17])
        store.rewrite_chunk(12, rows[12:16])
        assert store.verify() == []
    assert (tmp_path / "s" / store_module.DATA).read_bytes() == before


def test_skipped_rows_are_zero_and_invalid(tmp_path: Path, generator: torch.Generator):
    rows = make_store(tmp_path / "s", generator, skipped=[2, 3, 17])
    store = rk.EmbeddingStore.open(tmp_path / "s")
    assert sorted(store.skipped) == [2, 3, 17] and store.skipped[17] == "row 17 unreadable"
    assert store.valid.tolist() == [i not in (2, 3, 17) for i in range(N)]
    stored = np.asarray(store.array)
    assert not stored[[2, 3, 17]].any()
    keep = store.valid
    assert np.array_equal(stored[keep], rows[keep].astype(np.float16))
    # The PCA-whitening fit of the store is the fit of its valid rows.
    fitted = rk.fit_pca_whitening(store, 3)
    expected = rk.fit_pca_whitening(np.array(stored[keep]), 3)
    assert torch.allclose(fitted.mean, expected.mean) and torch.allclose(
        fitted.matrix, expected.matrix, atol=1e-5
    )
    assert store.verify() == []
    with rk.EmbeddingStore.create_or_resume(
        tmp_path / "s", N, DIM, fingerprint="fp", prior="test", input_size=None
    ) as writer:
        with pytest.raises(ValueError, match="outside this chunk"):
            writer.rewrite_chunk(0, rows[0:4], skipped={5: "x"})
        writer.rewrite_chunk(0, rows[0:4])  # a repaired chunk drops its old skip marks
    assert sorted(rk.EmbeddingStore.open(tmp_path / "s").skipped) == [17]


def test_a_store_without_checksums_opens_as_unverified(
    tmp_path: Path, generator: torch.Generator
) -> None:
    rows = make_store(tmp_path / "s", generator)
    path = tmp_path / "s" / store_module.MANIFEST
    manifest = json.loads(path.read_text())
    for key in ("checksum", "chunk_checksums", "skipped"):
        del manifest[key]
    manifest["format_version"] = 1  # as written before checksums existed
    manifest["rows_done"] = 16
    path.write_text(json.dumps(manifest))
    store = rk.EmbeddingStore.open(tmp_path / "s")
    assert store.unverified_rows == 16 and store.verify() == [] and store.skipped == {}
    with rk.EmbeddingStore.create_or_resume(
        tmp_path / "s", N, DIM, fingerprint="fp", prior="test", input_size=None
    ) as writer:
        for start, stop in writer.pending_chunks():
            writer.write_chunk(start, rows[start:stop])
    store = rk.EmbeddingStore.open(tmp_path / "s")
    assert store.complete and store.unverified_rows == 16
    zero_bytes(tmp_path / "s", 20, 21)
    assert store.verify() == [(20, 23)]  # the chunks written since are checked
    manifest = json.loads(path.read_text())
    manifest["chunk_checksums"] = ["not a number"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="damaged"):
        rk.EmbeddingStore.open(tmp_path / "s")


FAST = ["--workers", "0", "--no-progress", "--batch-size", "2", "--chunk-rows", "4"]


def test_embed_verify_repair_and_resume_refuse_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=7, seed=11)
    out = tmp_path / "store"
    argv = ["embed", "--data-dir", str(data), "--prior", "pixels:4", "--out", str(out), *FAST]
    assert main(argv) == 0
    capsys.readouterr()
    good = (out / store_module.DATA).read_bytes()
    transport = (out / "transport.pt").read_bytes()
    assert main(["embed", "--out", str(out), "--verify"]) == 0
    assert "14 of 14 rows written; checksums OK" in capsys.readouterr().out
    with open(out / store_module.DATA, "r+b") as handle:  # zero rows 5..6 (chunk 4..7)
        handle.seek(5 * 48 * 2)
        handle.write(b"\0" * 2 * 48 * 2)
    assert main(["embed", "--out", str(out), "--verify"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "DAMAGED: 4 rows in 1 chunk(s)" in lines[0]
    assert "rows 4-7" in lines[0] and "--repair" in lines[0]
    # A plain rerun refuses to fit a transport on damaged rows and changes nothing.
    assert main(argv) == 2
    assert "fail their checksum" in capsys.readouterr().err
    assert (out / "transport.pt").read_bytes() == transport
    # --repair recomputes only the damaged chunk; the store is as it was.
    assert main([*argv, "--repair"]) == 0
    assert "(0 computed now, 4 repaired)" in capsys.readouterr().out
    assert (out / store_module.DATA).read_bytes() == good
    assert main(["embed", "--out", str(out), "--verify"]) == 0


def test_embed_repair_of_a_precomputed_prior(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4, seed=12)
    table = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    np.save(tmp_path / "table.npy", table)
    prior = f"embeddings:{tmp_path / 'table.npy'}"
    options = dict(workers=0, progress=False, chunk_rows=4, log=lambda _: None)
    embed(data, prior, tmp_path / "s", **options)
    zero_bytes_at = tmp_path / "s" / store_module.DATA
    raw = bytearray(zero_bytes_at.read_bytes())
    raw[0:4] = b"\0\0\0\0"
    zero_bytes_at.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"rows 0-3"):
        embed(data, prior, tmp_path / "s", **options)
    result = embed(data, prior, tmp_path / "s", repair=True, **options)
    assert result.repaired_rows == 4 and result.computed_rows == 0
    stored = np.asarray(rk.EmbeddingStore.open(tmp_path / "s").array)
    assert np.array_equal(stored, table.astype(np.float16))


def test_embed_verify_needs_only_out_and_other_uses_need_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["embed", "--out", str(tmp_path / "none"), "--verify"]) == 2
    assert "no embedding store" in capsys.readouterr().err
    assert main(["embed", "--out", str(tmp_path / "x")]) == 2
    assert "--data-dir and --prior required" in capsys.readouterr().err
