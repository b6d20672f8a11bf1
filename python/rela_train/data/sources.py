"""Training and evaluation sources: uint8 image batches by sample index, whatever the storage.

A source yields ``Batch(images uint8 [B, C, H, W], indices int64 [B])`` for lists of sample
indices; the batched augmentation then runs on the training device. Two kinds:

* :class:`TensorSource` -- the whole set in memory (Fashion-MNIST, synthetic data): batches are
  plain indexing, no worker processes.
* :class:`FolderSource` -- an image folder decoded by DataLoader workers; each image is resized
  (shorter side) and center-cropped to ``load_size`` before augmentation. Corrupt images are
  skipped, counted and warned about once each; the batch (and the epoch) goes on without them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rela_train.augment import normalize
from rela_train.data.folder import IMAGE_EXTENSIONS, ImageFolder

__all__ = ["Batch", "FolderSource", "Source", "TensorSource", "build_sources"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, C, H, W]
    indices: torch.Tensor  # int64 [B], sample positions in the source


class Source:
    """Common interface of the training/evaluation sources."""

    name: str
    n: int
    channels: int
    labels: torch.Tensor  # int64 [n]
    classes: list[str]
    fingerprint: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: int = 0  # unreadable images skipped by training batches so far

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[Batch]:
        raise NotImplementedError

    def eval_batches(
        self, size: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(float images normalised [B, C, size, size], indices)`` over the whole source, in
        order, without augmentation."""
        raise NotImplementedError

    def subset(self, count: int, seed: int = 0) -> Source:
        """A fixed random subset of ``count`` samples (the same for the same seed)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n


class TensorSource(Source):
    """An in-memory uint8 image set."""

    def __init__(
        self,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: list[str],
        fingerprint: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty uint8 [N, C, H, W] image tensor")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
        self.name = name
        self.images = images
        self.labels = labels
        self.classes = classes
        self.fingerprint = fingerprint
        self.n = images.shape[0]
        self.channels = images.shape[1]
        self.mean, self.std = tuple(mean), tuple(std)

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[Batch]:
        for indices in index_batches:
            yield Batch(self.images[indices], indices)

    def eval_batches(
        self, size: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.n, batch_size):
            indices = torch.arange(start, min(start + batch_size, self.n))
            x = self.images[indices].to(torch.float32) / 255.0
            if x.shape[-1] != size or x.shape[-2] != size:
                # The whole image, resized: training crops are resized sub-images of it.
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            yield normalize(x, self.mean, self.std), indices

    def subset(self, count: int, seed: int = 0) -> TensorSource:
        if count >= self.n:
            return self
        chosen = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))[:count]
        chosen = chosen.sort().values
        return TensorSource(
            self.name,
            self.images[chosen],
            self.labels[chosen],
            self.classes,
            f"{self.fingerprint}:subset={count}:seed={seed}",
            self.mean,
            self.std,
        )


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------


def _resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


class _Decode(torch.utils.data.Dataset):
    """Item ``i``: ``(uint8 [3, S, S] or None if the file is unreadable, i, error text)``."""

    def __init__(self, folder: ImageFolder, size: int, indices: Sequence[int] | None) -> None:
        self.folder = folder
        self.size = size
        self.indices = indices

    def __len__(self) -> int:
        return len(self.folder) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        index = i if self.indices is None else int(self.indices[i])
        try:
            pixels = _resize_center_crop(self.folder.load(index), self.size)
        except (ValueError, OSError) as error:
            return None, index, str(error)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), index, ""


def _collate(items: list[tuple[torch.Tensor | None, int, str]]):
    good = [(image, index) for image, index, _ in items if image is not None]
    bad = [(index, error) for image, index, error in items if image is None]
    if good:
        images = torch.stack([image for image, _ in good])
        indices = torch.tensor([index for _, index in good], dtype=torch.int64)
    else:
        images, indices = None, torch.empty(0, dtype=torch.int64)
    return images, indices, bad


def _check_class_folders(root: Path) -> None:
    """An empty class folder is almost always a mistake (a failed copy); say which."""
    empty = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            has_image = any(
                Path(name).suffix.lower() in IMAGE_EXTENSIONS
                for _, _, files in os.walk(entry, followlinks=True)
                for name in files
                if not name.startswith(".")
            )
            if not has_image:
                empty.append(entry.name)
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise ValueError(
            f"image folder {root}: class folder(s) {shown} contain no images; remove them or "
            "fill them"
        )


class FolderSource(Source):
    """An image folder (class subfolders), decoded by ``workers`` processes."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        load_size: int,
        workers: int = 0,
        *,
        warn: Callable[[str], None] | None = None,
        indices: torch.Tensor | None = None,
        fingerprint: str | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
        _check_class_folders(root)
        self.folder = ImageFolder(root)
        self.name = str(root)
        self.load_size = load_size
        self.workers = workers
        self._indices = indices  # positions in the folder, or None for all
        all_labels = torch.tensor([s.label for s in self.folder.samples], dtype=torch.int64)
        self.labels = all_labels if indices is None else all_labels[indices]
        self.n = len(self.labels)
        self.classes = self.folder.classes or ["(root)"]
        self.fingerprint = fingerprint or self.folder.fingerprint
        self.channels = 3
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        self._warned: set[int] = set()
        self.skipped = 0

    def _loader(self, batch_sampler: Sequence[Sequence[int]]):
        dataset = _Decode(self.folder, self.load_size, self._indices)
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=self.workers,
            collate_fn=_collate,
            persistent_workers=False,
            prefetch_factor=4 if self.workers > 0 else None,
        )

    def _positions(self, indices: torch.Tensor) -> torch.Tensor:
        # Map folder positions back to source positions when this source is a subset.
        if self._indices is None:
            return indices
        lookup = {int(v): i for i, v in enumerate(self._indices)}
        return torch.tensor([lookup[int(v)] for v in indices], dtype=torch.int64)

    def _record(self, bad: list[tuple[int, str]], *, count: bool) -> None:
        for index, error in bad:
            self.skipped += int(count)
            if index not in self._warned:
                self._warned.add(index)
                self._warn(f"warning: skipping unreadable image ({error})")

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[Batch]:
        sampler = [[int(i) for i in batch] for batch in index_batches]
        for images, indices, bad in self._loader(sampler):
            self._record(bad, count=True)
            if images is not None:
                yield Batch(images, self._positions(indices))

    def eval_batches(
        self, size: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = [
            list(range(s, min(s + batch_size, self.n))) for s in range(0, self.n, batch_size)
        ]
        for images, indices, bad in self._loader(sampler):
            self._record(bad, count=False)
            if images is None:
                continue
            x = images.to(torch.float32) / 255.0
            offset = (self.load_size - size) // 2
            x = x[:, :, offset : offset + size, offset : offset + size]
            yield normalize(x, self.mean, self.std), self._positions(indices)

    def subset(self, count: int, seed: int = 0) -> FolderSource:
        if count >= self.n:
            return self
        chosen = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))[:count]
        chosen = chosen.sort().values
        base = chosen if self._indices is None else self._indices[chosen]
        return FolderSource(
            self.folder.root,
            self.load_size,
            self.workers,
            warn=self._warn,
            indices=base,
            fingerprint=f"{self.fingerprint}:subset={count}:seed={seed}",
        )


# ----------------------------------------------------------------------------------------------


def build_sources(config, *, warn: Callable[[str], None] | None = None) -> tuple[Source, Source]:
    """``(train, val)`` sources of a :class:`~rela_train.config.TrainConfig`."""
    from rela_train.data.fashion_mnist import CLASSES, MEAN, STD, load_fashion_mnist
    from rela_train.data.synthetic import MEAN as SYN_MEAN
    from rela_train.data.synthetic import STD as SYN_STD
    from rela_train.data.synthetic import make_synthetic

    if config.dataset == "fashion-mnist":
        sources = []
        for split in ("train", "test"):
            images, labels, fingerprint = load_fashion_mnist(config.data_dir, split)
            name = f"fashion-mnist/{split}"
            sources.append(TensorSource(name, images, labels, CLASSES, fingerprint, MEAN, STD))
        train, val = sources
    elif config.dataset == "synthetic":
        n_train = config.train_subset or 256
        n_val = config.val_subset or 128
        classes = [f"class_{k}" for k in range(4)]
        made = [
            make_synthetic(n, size=config.image_size + 4, seed=config.seed, split=split)
            for n, split in ((n_train, "train"), (n_val, "test"))
        ]
        train, val = (
            TensorSource(f"synthetic/{split}", x, y, classes, fp, SYN_MEAN, SYN_STD)
            for (x, y, fp), split in zip(made, ("train", "test"), strict=True)
        )
        return train, val
    else:
        load_size = config.load_size or max(config.image_size, round(config.image_size * 8 / 7))
        train = FolderSource(config.data_dir, load_size, config.workers, warn=warn)
        if config.val_dir is None:
            raise ValueError("--val-dir: the folder dataset needs an evaluation image folder")
        val = FolderSource(config.val_dir, load_size, config.workers, warn=warn)
    if config.train_subset is not None:
        train = train.subset(config.train_subset)
    if config.val_subset is not None:
        val = val.subset(config.val_subset)
    return train, val
