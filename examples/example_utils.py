"""What the examples share: Fashion-MNIST (or synthetic stand-in) data, a small CNN, kNN.

Only torch and numpy: the examples do not import ``rela_train``. Data come as float32 tensors
``[N, 1, 28, 28]`` in [0, 1] with int64 labels.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Where Debian's dataset-fashion-mnist package puts the IDX files (`make demo` installs it).
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class Data:
    name: str
    train_x: torch.Tensor  # float32 [N, 1, 28, 28] in [0, 1]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor


def fail(prog: str, message: str) -> None:
    """One error line and exit status 2, as a command-line tool does."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory of the four Fashion-MNIST IDX files (.gz or not); default: "
        f"{DEFAULT_DATA_DIR} when present, else synthetic data",
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="use synthetic 10-class images, even if present"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)


def _idx_path(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def synthetic(n: int, seed: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable stand-in images: one smooth random template per class (the classes share most
    of it), shifted by up to 4 px, plus noise. The templates depend only on ``classes``: train
    and test share them."""
    fixed = torch.Generator().manual_seed(1234)
    shared = torch.rand(1, 1, 7, 7, generator=fixed)
    templates = shared + 0.6 * torch.rand(classes, 1, 7, 7, generator=fixed)  # alike classes
    templates = F.interpolate(templates, size=28, mode="bilinear", align_corners=False) / 1.6
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    images = templates[labels]
    shifts = torch.randint(-4, 5, (n, 2), generator=g)
    images = torch.stack(
        [
            torch.roll(img, (int(dy), int(dx)), dims=(1, 2))
            for img, (dy, dx) in zip(images, shifts, strict=True)
        ]
    )
    images = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return images, labels


def load_data(args: argparse.Namespace, prog: str, train: int | None, test: int | None) -> Data:
    """Fashion-MNIST from ``--data-dir`` (an error line if it lacks the files), else from the
    default location when present, else synthetic data; ``train``/``test`` cap the sizes (a fixed
    random subset; None: all)."""
    directory = args.data_dir
    if (
        directory is None
        and not args.synthetic
        and _idx_path(DEFAULT_DATA_DIR, FILES["train_images"])
    ):
        directory = DEFAULT_DATA_DIR
    if directory is None:
        n_train, n_test = train or 60_000, test or 10_000
        train_x, train_y = synthetic(n_train, seed=args.seed)
        test_x, test_y = synthetic(n_test, seed=args.seed + 1)
        return Data("synthetic", train_x, train_y, test_x, test_y)
    if not directory.is_dir():
        fail(prog, f"--data-dir: expected a directory of Fashion-MNIST IDX files, got {directory}")
    paths = {key: _idx_path(directory, stem) for key, stem in FILES.items()}
    missing = [FILES[key] for key, path in paths.items() if path is None]
    if missing:
        fail(prog, f"--data-dir: {directory} lacks {', '.join(missing)} (.gz or not)")
    arrays = {key: _read_idx(path) for key, path in paths.items()}
    g = torch.Generator().manual_seed(args.seed)

    def take(images: np.ndarray, labels: np.ndarray, count: int | None):
        x = torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1)
        y = torch.from_numpy(labels.astype(np.int64))
        if count is not None and count < len(y):
            keep = torch.randperm(len(y), generator=g)[:count]
            x, y = x[keep], y[keep]
        return x, y

    train_x, train_y = take(arrays["train_images"], arrays["train_labels"], train)
    test_x, test_y = take(arrays["test_images"], arrays["test_labels"], test)
    return Data(f"Fashion-MNIST ({directory})", train_x, train_y, test_x, test_y)


class SmallCNN(nn.Module):
    """Three conv blocks, flattened: ``[B, 1, 28, 28] -> [B, width * 4 * 9]`` features (the
    3 x 3 map keeps where things are, which the pixel prior's targets depend on)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(1, width), block(width, width * 2), block(width * 2, width * 4)
        )
        self.out_dim = width * 4 * 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light augmentation on a batch: random horizontal flips and shifts of up to 2 px."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(x, (dy, dx), dims=(2, 3))


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    model.eval()
    out = torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])
    model.train()
    return F.normalize(out, dim=1)


@torch.no_grad()
def knn_accuracy(
    model: nn.Module, data: Data, k: int = 20, temperature: float = 0.1, classes: int = 10
) -> float:
    """Weighted kNN (cosine similarity, exp(sim / T) votes) of the test images against the
    training images, with the model's features."""
    bank, queries = embed(model, data.train_x), embed(model, data.test_x)
    correct = 0
    for start in range(0, len(queries), 1024):
        sim = queries[start : start + 1024] @ bank.T
        top, index = sim.topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(top), classes)
        votes.scatter_add_(1, data.train_y[index], (top / temperature).exp())
        correct += int((votes.argmax(1) == data.test_y[start : start + 1024]).sum())
    return correct / len(queries)
