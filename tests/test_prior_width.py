"""The prior package's shared parts: one width rule, one chunk loop fed by two batch producers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from image_folder import make_image_folder
from rela_train.data.sources import TensorSource
from rela_train.prior.embedding import (
    TRANSPORT_FILE,
    EmbedBatch,
    embed,
    embed_tensors,
    tensor_batches,
    transport_width,
    write_embeddings,
)
from rela_train.prior.loaders import load_prior
from rela_train.prior.targets import prepare_prior

import rela_kernels as rk


def _widest(cap: int, prior_dim: int, rows: int) -> int:
    """The rule spelled out: the largest d <= cap that fits D and N - 1 centred directions, or 1."""
    fitting = [d for d in range(1, cap + 1) if d <= prior_dim and d <= rows - 1]
    return max(fitting, default=1)


def test_transport_width_rule(generator: torch.Generator) -> None:
    for _ in range(300):
        cap, prior_dim, rows = (int(v) for v in torch.randint(1, 40, (3,), generator=generator))
        width = transport_width(cap, prior_dim, rows)
        assert width == _widest(cap, prior_dim, rows), (cap, prior_dim, rows)
        if cap <= min(prior_dim, rows - 1):
            assert width == cap  # an accepted explicit width comes back unchanged


def _source(generator: torch.Generator, n: int, channels: int = 1) -> TensorSource:
    images = torch.randint(0, 256, (n, channels, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.zeros(n, dtype=torch.long)
    return TensorSource("tiny", images, labels, ["a"], f"fp-tiny-{n}", (0.5,), (0.5,))


def test_fit_clamps_the_width_where_embed_refuses_it(
    generator: torch.Generator, tmp_path: Path
) -> None:
    # N - 1 = 4 centred directions; pixels:2 has D = 12. Each of images 1-4 lights one 4 x 4
    # quadrant (one pixel of the 2 x 2 prior) above random dim noise, so the 4 directions always
    # have real variance: five fully random images leave the smallest one negligible now and then,
    # and the transport is then (rightly) clipped below 4.
    images = torch.randint(0, 32, (5, 1, 8, 8), dtype=torch.uint8, generator=generator)
    for i, (row, col) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)], start=1):
        bright = torch.randint(160, 256, (4, 4), dtype=torch.uint8, generator=generator)
        images[i, 0, row : row + 4, col : col + 4] = bright
    labels = torch.zeros(5, dtype=torch.long)
    source = TensorSource("tiny", images, labels, ["a"], "fp-tiny-5", (0.5,), (0.5,))
    targets = prepare_prior(
        source=source,
        prior="pixels:2",
        prior_store=None,
        run_dir=tmp_path,
        dim=1000,
        device=torch.device("cpu"),
        log=lambda message: None,
    )
    assert targets.dim == transport_width(1000, 12, 5) == 4
    assert rk.Transport.load(tmp_path / "prior" / TRANSPORT_FILE).out_dim == 4

    folder = make_image_folder(tmp_path / "data", classes=2, per_class=3, seed=3)  # 6 images
    quiet = {"workers": 0, "progress": False, "log": lambda message: None}
    with pytest.raises(ValueError, match=r"^dim 13 is larger than the prior's embedding width 12$"):
        embed(folder, "pixels:2", tmp_path / "a", dim=13, **quiet)
    with pytest.raises(ValueError, match=r"^dim 6 needs at least 7 images \(N - 1 >= dim\)"):
        embed(folder, "pixels:2", tmp_path / "b", dim=6, **quiet)
    with pytest.raises(ValueError, match=r"^dim must be a positive int, got 0$"):
        embed(folder, "pixels:2", tmp_path / "c", dim=0, **quiet)
    assert not any((tmp_path / name).exists() for name in "abc")
    assert embed(folder, "pixels:2", tmp_path / "d", **quiet).dim == transport_width(256, 12, 6)


@pytest.mark.parametrize("channels", [1, 3])
def test_embed_tensors_matches_a_whole_set_preprocessing(
    generator: torch.Generator, tmp_path: Path, channels: int
) -> None:
    # Small batches make several chunks (4 * 8 = 32 rows each, the last one partial), so the
    # chunk loop's bookkeeping is exercised; the expected rows are computed in one go.
    source = _source(generator, 70, channels)
    prior = load_prior("pixels:4", num_rows=source.n)
    store = embed_tensors(source, prior, tmp_path / "store", batch_size=4, log=lambda m: None)
    assert store.complete and store.chunk_rows == 32 and store.metadata["data"] == "tiny"
    x = source.images.to(torch.float32).div(255.0).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(4, 4), mode="bilinear", antialias=True)
    mean = torch.tensor(prior.transform.mean).view(1, 3, 1, 1)
    std = torch.tensor(prior.transform.std).view(1, 3, 1, 1)
    expected = prior.encode((x - mean) / std).to(torch.float16)
    assert torch.equal(store.read(range(source.n)), expected)
    batches = list(tensor_batches(source, prior, [(0, 32), (32, 64), (64, 70)], batch_size=4))
    assert [len(b.rows) for b in batches] == [4] * 17 + [2]  # never straddles a chunk boundary
    assert all(np.array_equal(b.indices, np.asarray(b.rows)) and not b.skipped for b in batches)


class _FakePrior:
    """encode() returns each row's index in every column, or inf for the rows in ``bad``."""

    spec = "fake:1"
    dim = 3

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        rows = images[:, 0].clone()
        for i, row in enumerate(images[:, 0].tolist()):
            if int(row) in self.bad:
                rows[i] = float("inf")
        return rows[:, None].expand(-1, self.dim).float()


def _batches(n: int, size: int, skip: set[int]) -> list[EmbedBatch]:
    out = []
    for first in range(0, n, size):
        rows = range(first, min(first + size, n))
        good = [r for r in rows if r not in skip]
        images = torch.tensor(good, dtype=torch.float32)[:, None] if good else None
        bad = [(r, f"file {r} is truncated") for r in rows if r in skip]
        out.append(EmbedBatch(rows, images, np.asarray(good, dtype=np.int64), bad))
    return out


def _store(path: Path, n: int) -> rk.EmbeddingStore:
    return rk.EmbeddingStore.create_or_resume(
        path, n, 3, fingerprint="fp", prior="fake:1", input_size=None, chunk_rows=4
    )


def test_write_embeddings_stores_rows_and_marks_skipped_ones(tmp_path: Path) -> None:
    messages: list[str] = []
    with _store(tmp_path / "s", 10) as store:
        chunks = store.pending_chunks()
        batches = iter(_batches(10, 2, {5}))
        write_embeddings(
            store, chunks, store.write_chunk, _FakePrior(set()), batches, str, log=messages.append
        )
    store = rk.EmbeddingStore.open(tmp_path / "s")
    expected = np.repeat(np.arange(10, dtype=np.float16)[:, None], 3, axis=1)
    expected[5] = 0
    assert np.array_equal(store.array, expected)
    assert sorted(store.skipped) == [5] and messages == [
        "warning: skipping unreadable image (file 5 is truncated)"
    ]


def test_write_embeddings_names_the_input_of_a_bad_output_and_writes_no_part_of_its_chunk(
    tmp_path: Path,
) -> None:
    with _store(tmp_path / "s", 10) as store:
        chunks = store.pending_chunks()
        with pytest.raises(ValueError) as error:
            write_embeddings(
                store,
                chunks,
                store.write_chunk,
                _FakePrior({6}),
                iter(_batches(10, 2, set())),
                lambda row: f"images.bin row {row}",
                log=lambda m: None,
            )
        assert store.rows_done == 4  # the first chunk is durable; the failing one is not
    assert str(error.value) == (
        "prior fake:1 produced non-finite values or values beyond float16's range for image 6 "
        "(images.bin row 6)"
    )
