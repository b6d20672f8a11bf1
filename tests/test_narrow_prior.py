"""A prior with fewer non-degenerate principal components than the target
width (``--rela-dim-rule min-width`` with a prior no wider than the backbone) is clipped to its
usable rank with a warning naming the prior and the rank, instead of failing the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rela_train.data.sources import FolderSource
from rela_train.prior.embedding import embed
from rela_train.prior.targets import fit_prior_transport, prepare_prior

import rela_kernels as rk


def _low_rank(rows: int = 300, rank: int = 3, width: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, width, generator=g) + 2.0


def test_clip_to_rank_keeps_the_usable_components() -> None:
    x = _low_rank().double()
    with pytest.raises(ValueError, match="Use dim <= 3"):
        rk.fit_pca_whitening(x, 5)
    clipped = rk.fit_pca_whitening(x, 5, clip_to_rank=True)
    exact = rk.fit_pca_whitening(x, 3)
    assert clipped.out_dim == 3
    torch.testing.assert_close(clipped.matrix, exact.matrix)
    torch.testing.assert_close(clipped.mean, exact.mean)
    # A full-rank request is untouched by the option.
    full = rk.fit_pca_whitening(x, 2, clip_to_rank=True)
    torch.testing.assert_close(full.matrix, rk.fit_pca_whitening(x, 2).matrix)


def test_the_trainer_clips_a_narrow_prior_with_a_warning(tmp_path: Path) -> None:
    rows = _low_rank().numpy().astype(np.float32)
    store = rk.EmbeddingStore.create_or_resume(
        tmp_path / "prior", rows.shape[0], rows.shape[1], fingerprint="f", prior="pixels:2",
        input_size=None, chunk_rows=128,
    )  # fmt: skip
    for start, stop in store.pending_chunks():
        store.write_chunk(start, rows[start:stop])
    store.close()
    messages: list[str] = []
    path = tmp_path / "prior" / "transport.pt"
    fit_prior_transport(
        rk.EmbeddingStore.open(tmp_path / "prior"), 6, path, "pixels:2", messages.append
    )
    transport = rk.Transport.load(path)
    assert transport.out_dim == 3
    (warning,) = messages
    assert warning.startswith("warning: --prior pixels:2:") and "rank 3" in warning
    # Each kept target component has unit variance on the fitted rows (whitened, not noise).
    targets = (
        torch.from_numpy(rows).double() - transport.mean.double()
    ) @ transport.matrix.double()
    variance = targets.var(0, unbiased=False)
    torch.testing.assert_close(variance, torch.ones(3, dtype=torch.float64), rtol=1e-3, atol=0)
    # Wide enough: no warning.
    messages.clear()
    fit_prior_transport(
        rk.EmbeddingStore.open(tmp_path / "prior"), 3, path, "pixels:2", messages.append
    )
    assert messages == []


def _rank_two_folder(root: Path, per_class: int = 5) -> Path:
    """PNG images whose pixels:2 embeddings span 2 centred directions: every image is the
    same mid-grey with its left and right halves brightened by two amounts."""
    rng = np.random.default_rng(0)
    for k in range(2):
        (root / f"class_{k}").mkdir(parents=True)
        for i in range(per_class):
            left, right = (int(v) for v in rng.integers(0, 100, size=2))
            pixels = np.full((8, 8, 3), 100, dtype=np.uint8)
            pixels[:, :4] += np.uint8(left)
            pixels[:, 4:] += np.uint8(right)
            Image.fromarray(pixels).save(root / f"class_{k}" / f"img_{i}.png")
    return root


def test_an_image_folder_prior_is_clipped_like_an_in_memory_one(tmp_path: Path) -> None:
    # Before, fit's image-folder path fitted the transport inside `embed`, whose strict check
    # refused this prior ("only 2 principal components have non-negligible variance").
    data = _rank_two_folder(tmp_path / "data")
    messages: list[str] = []
    targets = prepare_prior(
        source=FolderSource(data, 10, workers=0),
        prior="pixels:2",
        prior_store=None,
        run_dir=tmp_path / "run",
        dim=5,
        device=torch.device("cpu"),
        log=messages.append,
    )
    assert targets.dim == 2
    (warning,) = [m for m in messages if m.startswith("warning:")]
    assert warning.startswith("warning: --prior pixels:2: only 2 of the 5") and "rank 2" in warning
    # `embed` with an explicit width keeps its strict check.
    with pytest.raises(ValueError, match="non-negligible variance"):
        embed(data, "pixels:2", tmp_path / "strict", dim=5, workers=0, progress=False,
              log=lambda message: None)  # fmt: skip
    # A second run finds the store and the transport: nothing is embedded or fitted again.
    messages.clear()
    again = prepare_prior(
        source=FolderSource(data, 10, workers=0), prior="pixels:2", prior_store=None,
        run_dir=tmp_path / "run", dim=5, device=torch.device("cpu"), log=messages.append,
    )  # fmt: skip
    assert again.dim == 2 and messages == []
