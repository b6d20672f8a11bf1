"""Fashion-MNIST (Xiao et al. 2017) from its IDX files, held in memory as uint8 tensors.

The default directory is where Debian's ``dataset-fashion-mnist`` package installs the files
(``apt-get install dataset-fashion-mnist``). Both the gzipped (``*.gz``) and the plain files are
read. The IDX format: a big-endian header (magic ``0x00000803`` for images with rows/columns,
``0x00000801`` for labels, then the item count) followed by raw uint8 data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = ["CLASSES", "DEFAULT_DIR", "MEAN", "STD", "install_hint", "load_fashion_mnist"]

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Statistics of the training images on the [0, 1] scale.
MEAN = (0.2860,)
STD = (0.3530,)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def install_hint(directory: Path) -> str:
    return (
        f"Fashion-MNIST IDX files not found in {directory}. Install them with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
        f"{DEFAULT_DIR}), or download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
        "the Fashion-MNIST project into one directory and pass it with --data-dir"
    )


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(install_hint(directory))


def _read(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read {path}: {error} (corrupt or truncated file?)") from error


def _parse(path: Path, data: bytes, magic: int) -> np.ndarray:
    dims = magic & 0xFF
    header = 4 + 4 * dims
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
        raise ValueError(f"{path} is not an IDX file with magic {magic:#010x}")
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header says {shape} = {expected} bytes of data, file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    directory: str | os.PathLike[str] | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(images uint8 [N, 1, 28, 28], labels int64 [N], fingerprint)`` of one split.

    ``split`` is ``train`` (60000 images) or ``test`` (10000). The fingerprint is a sha256 of the
    image and label bytes: it identifies the data, not where it lives.

    Raises:
        FileNotFoundError: the directory or a file is missing (the message says how to get them).
        ValueError: a file is not a valid IDX file, or images and labels disagree.
    """
    directory = DEFAULT_DIR if directory is None else Path(directory)
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; known: train, test")
    if not directory.is_dir():
        raise FileNotFoundError(install_hint(directory))
    image_path, label_path = (_find(directory, stem) for stem in _FILES[split])
    image_bytes, label_bytes = _read(image_path), _read(label_path)
    images = _parse(image_path, image_bytes, 0x00000803)
    labels = _parse(label_path, label_bytes, 0x00000801)
    if images.ndim != 3 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{image_path} holds {images.shape} images but {label_path} holds "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{label_path}: label {int(labels.max())} is not a Fashion-MNIST class")
    digest = hashlib.sha256(image_bytes)
    digest.update(label_bytes)
    fingerprint = f"fashion-mnist:{split}:{digest.hexdigest()[:32]}"
    tensor = torch.from_numpy(images.copy()).unsqueeze(1)
    return tensor, torch.from_numpy(labels.astype(np.int64)), fingerprint
