"""Training and evaluation sources: uint8 image batches by sample index, whatever the storage.

A source yields ``Batch(images uint8 [B, C, H, W], indices int64 [B])`` for lists of sample
indices; the batched augmentation then runs on the training device. Two kinds:

* :class:`TensorSource` -- the whole set in memory (Fashion-MNIST, synthetic data): batches are
  plain indexing, no worker processes. A crop plan is ignored: the device crops.
* :class:`FolderSource` -- an image folder decoded by DataLoader workers. Without a crop plan
  each image is resized (shorter side) and center-cropped to ``load_size`` before augmentation.
  With a :class:`~rela_train.data.views.CropPlan` the workers cut the views themselves from the
  full image (draft-mode JPEG decoding, crop before resize, see ``rela_train.data.views``) and
  yield ``Batch(images=None, views uint8 [B, V, 3, S, S])``; only the photometric half of the
  augmentation is left for the device. Corrupt images are skipped, counted and warned about once
  each; the batch (and the epoch) goes on without them.

The DataLoader of a folder source, and its worker processes, live as long as the source (until
:meth:`FolderSource.close`): each pass (``batches()``, ``eval_batches()``) only hands it a new
list of index batches.
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

from rela_train.data.augment import normalize
from rela_train.data.folder import IMAGE_EXTENSIONS, ImageFolder
from rela_train.data.images import UnreadableImage, to_rgb
from rela_train.data.val_labels import read_val_labels
from rela_train.data.views import CropPlan, decode_views, load_rgb, resolve_decoder

__all__ = ["Batch", "FolderSource", "Source", "TensorSource", "build_sources"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    images: torch.Tensor | None  # uint8 [B, C, H, W]; None when the loader cut the views
    indices: torch.Tensor  # int64 [B], sample positions in the source
    views: torch.Tensor | None = None  # uint8 [B, V, 3, S, S] cut by a CropPlan, else None


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

    def batches(
        self, index_batches: Sequence[torch.Tensor], plan: CropPlan | None = None
    ) -> Iterator[Batch]:
        """One :class:`Batch` per list of sample positions, in order (unreadable images are left
        out of their batch). ``plan``: cut the views in the loader where the source can."""
        raise NotImplementedError

    def eval_batches(
        self, size: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(float images normalised [B, C, size, size], indices)`` over the whole source, in
        order, without augmentation."""
        raise NotImplementedError

    def unreadable(self) -> list[str]:
        """One line per unreadable image met so far (file and reason), in first-met order."""
        return []

    def close(self) -> None:
        """Release worker processes, if any (the source stays usable: they restart on demand)."""

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

    def batches(
        self, index_batches: Sequence[torch.Tensor], plan: CropPlan | None = None
    ) -> Iterator[Batch]:
        # The plan is ignored: in-memory images are small, the device crops them in batch.
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
    image = to_rgb(image)
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


# Key tag of evaluation items: resize + center crop to load_size, JPEGs decoded shrunk on load.
_EVAL = "eval"


class _Decode(torch.utils.data.Dataset):
    """Decodes one key to ``(uint8 pixels, or None if the file is unreadable, position, error)``.

    Keys (``position`` is the sample's position in the source):

    * ``position``: ``[3, L, L]``, the full image resized (shorter side) and center-cropped to
      ``L = size``;
    * ``(position, CropPlan)``: that sample's views ``[V, 3, S, S]`` (``decode_views``);
    * ``(position, "eval")``: ``[3, L, L]`` like a plain position, JPEGs decoded in draft mode.
    """

    def __init__(
        self, folder: ImageFolder, size: int, indices: Sequence[int] | None, decoder: str
    ) -> None:
        self.folder = folder
        self.size = size
        self.indices = None if indices is None else [int(i) for i in indices]
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.folder) if self.indices is None else len(self.indices)

    def __getitem__(self, key) -> tuple[torch.Tensor | None, int, str]:
        position, plan = key if isinstance(key, tuple) else (key, None)
        index = position if self.indices is None else self.indices[position]
        try:
            if isinstance(plan, CropPlan):
                path = self.folder.root / self.folder.samples[index].path
                return decode_views(path, plan, position, self.decoder), position, ""
            if plan == _EVAL:
                path = self.folder.root / self.folder.samples[index].path
                image = load_rgb(path, shrink_to=self.size)
            else:
                image = self.folder.load(index)
            pixels = _resize_center_crop(image, self.size)
        except UnreadableImage as error:
            return None, position, str(error)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), position, ""


def _collate(items: list[tuple[torch.Tensor | None, int, str]]):
    good = [(pixels, position) for pixels, position, _ in items if pixels is not None]
    bad = [(position, error) for pixels, position, error in items if pixels is None]
    if good:
        pixels = torch.stack([p for p, _ in good])
        positions = torch.tensor([position for _, position in good], dtype=torch.int64)
    else:
        pixels, positions = None, torch.empty(0, dtype=torch.int64)
    return pixels, positions, bad


class _BatchList:
    """The batch sampler of a folder source's one DataLoader.

    The DataLoader iterates it in the main process when a pass starts and sends only each batch's
    keys to the workers, so replacing ``batches`` before a pass is all a new pass needs (worker
    processes stay up).
    """

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


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
    """An image folder (class subfolders), decoded by ``workers`` processes.

    Args:
        root: the folder.
        load_size: side of the images of ``batches()`` without a plan and of ``eval_batches``.
        workers: decoding processes (0: decode in the calling process). They start with the
            first pass and stay up, across passes and epochs, until :meth:`close`.
        pin_memory: pin the yielded tensors for asynchronous copies to the GPU; ignored (and
            ``self.pin_memory`` False) when CUDA is not available.
        decoder: JPEG decoder of crop plans, ``"auto"``, ``"pil"`` or ``"simplejpeg"``.
        prefetch: batches each worker decodes ahead.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        load_size: int,
        workers: int = 0,
        *,
        warn: Callable[[str], None] | None = None,
        indices: torch.Tensor | None = None,
        fingerprint: str | None = None,
        pin_memory: bool = False,
        decoder: str = "auto",
        prefetch: int = 4,
        labels_file: str | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        self.decoder = resolve_decoder(decoder)
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
        _check_class_folders(root)
        self.folder = ImageFolder(root)
        self.name = str(root)
        self.load_size = load_size
        self.workers = workers
        self.prefetch = prefetch
        self._pin_requested = pin_memory
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self._indices = indices  # positions in the folder, or None for all
        self._labels_file, self._label_classes = labels_file, classes
        if labels_file is not None:  # a flat folder labelled by a file, in the given classes
            all_labels = read_val_labels(labels_file, root, self.folder.samples, classes or [])
            self.classes = list(classes or [])
        else:
            all_labels = torch.tensor([s.label for s in self.folder.samples], dtype=torch.int64)
            self.classes = self.folder.classes or ["(root)"]
        self.labels = all_labels if indices is None else all_labels[indices]
        self.n = len(self.labels)
        self.fingerprint = fingerprint or self.folder.fingerprint
        self.channels = 3
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        self._warned: dict[int, str] = {}  # position -> "cannot read image PATH: reason"
        self.skipped = 0
        self._sampler = _BatchList()
        self._loader: torch.utils.data.DataLoader | None = None
        self._generation = 0  # bumped by every pass: older pass iterators become stale

    def _get_loader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            dataset = _Decode(self.folder, self.load_size, self._indices, self.decoder)
            self._loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=self._sampler,
                num_workers=self.workers,
                collate_fn=_collate,
                pin_memory=self.pin_memory,
                persistent_workers=self.workers > 0,
                prefetch_factor=self.prefetch if self.workers > 0 else None,
            )
        return self._loader

    def _pass(self, key_batches: list[list]) -> Iterator[tuple]:
        """Start a pass over ``key_batches`` now (workers begin decoding at once)."""
        self._generation += 1
        self._sampler.batches = key_batches
        # With persistent workers this resets the loader's one iterator: whatever an abandoned
        # pass still had in flight is drained and dropped.
        return self._drain(iter(self._get_loader()), self._generation)

    def _drain(self, iterator: Iterator[tuple], generation: int) -> Iterator[tuple]:
        while True:
            if generation != self._generation:
                raise RuntimeError(
                    f"{self.name}: this batch stream was replaced by a later batches() or "
                    "eval_batches() call (or close()); a folder source runs one stream at a time"
                )
            try:
                item = next(iterator)
            except StopIteration:
                return
            yield item

    def _record(self, bad: list[tuple[int, str]], *, count: bool) -> None:
        for position, error in bad:
            self.skipped += int(count)
            if position not in self._warned:
                self._warned[position] = error
                self._warn(f"warning: skipping unreadable image ({error})")

    def unreadable(self) -> list[str]:
        return list(self._warned.values())

    def batches(
        self, index_batches: Sequence[torch.Tensor], plan: CropPlan | None = None
    ) -> Iterator[Batch]:
        """Decode the batches (the pass starts now). With ``plan``: ``Batch(images=None,
        views=uint8 [B, V, 3, plan.size, plan.size])``, else ``Batch(images=uint8
        [B, 3, load_size, load_size])``. Starting another pass (or ``close()``) makes this
        iterator raise RuntimeError when advanced; abandoning it half-way is fine."""
        if plan is None:
            keys = [[int(i) for i in batch] for batch in index_batches]
        else:
            keys = [[(int(i), plan) for i in batch] for batch in index_batches]
        return self._train_batches(self._pass(keys), plan is not None)

    def _train_batches(self, stream: Iterator[tuple], views: bool) -> Iterator[Batch]:
        for pixels, positions, bad in stream:
            self._record(bad, count=True)
            if pixels is None:
                continue
            yield Batch(None, positions, views=pixels) if views else Batch(pixels, positions)

    def eval_batches(
        self, size: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = [
            [(i, _EVAL) for i in range(s, min(s + batch_size, self.n))]
            for s in range(0, self.n, batch_size)
        ]
        return self._eval_batches(self._pass(keys), size)

    def _eval_batches(
        self, stream: Iterator[tuple], size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, positions, bad in stream:
            self._record(bad, count=False)
            if images is None:
                continue
            x = images.to(torch.float32) / 255.0
            offset = (self.load_size - size) // 2
            x = x[:, :, offset : offset + size, offset : offset + size]
            yield normalize(x, self.mean, self.std), positions

    def close(self) -> None:
        """Shut the worker processes down now (a later pass starts new ones)."""
        loader, self._loader = self._loader, None
        self._generation += 1
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            loader._iterator = None

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
            pin_memory=self._pin_requested,
            decoder=self.decoder,
            prefetch=self.prefetch,
            labels_file=self._labels_file,
            classes=self._label_classes,
        )


# ----------------------------------------------------------------------------------------------


def build_sources(
    config, *, warn: Callable[[str], None] | None = None, pin_memory: bool = False
) -> tuple[Source, Source]:
    """``(train, val)`` sources of a :class:`~rela_train.config.TrainConfig`.

    ``pin_memory`` (folder sources, with CUDA only) pins the batches the loader yields; the JPEG
    decoder is ``config.decoder``.
    """
    from rela_train.data.fashion_mnist import CLASSES, MEAN, STD, load_fashion_mnist
    from rela_train.data.synthetic import MEAN as SYN_MEAN
    from rela_train.data.synthetic import STD as SYN_STD
    from rela_train.data.synthetic import make_synthetic

    if config.val_labels is not None and config.dataset != "folder":
        raise ValueError(
            f"--val-labels: labels a flat image folder (--dataset folder), not {config.dataset}"
        )
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
        options = {
            "warn": warn,
            "pin_memory": pin_memory,
            "decoder": config.decoder,
            "prefetch": config.prefetch,
        }
        train = FolderSource(config.data_dir, load_size, config.workers, **options)
        if config.val_dir is None:
            raise ValueError("--val-dir: the folder dataset needs an evaluation image folder")
        val = FolderSource(
            config.val_dir, load_size, config.workers, **options,
            labels_file=config.val_labels, classes=train.classes if config.val_labels else None,
        )  # fmt: skip
    if config.train_subset is not None:
        train = train.subset(config.train_subset)
    if config.val_subset is not None:
        val = val.subset(config.val_subset)
    return train, val
