"""The transported prior: a network this trainer trained on other data, as a ``checkpoint:`` prior.

Two steps around one ordinary ``rela-train fit``:

* :func:`write_class_subset` writes a copy of Fashion-MNIST holding only some classes, as IDX
  files that ``fit --data-dir`` reads like the original;
* :func:`rgb_prior_checkpoint` turns the trained run's backbone into a state dict that the
  ``checkpoint:ARCH:PATH`` prior loads. The trainer's backbone reads one gray channel normalised
  with Fashion-MNIST's statistics; the prior feeds it RGB (the gray value three times) normalised
  with ImageNet's. The first convolution is rewritten so that, on such input, it computes what
  the trained one computes on gray input: the weights are spread over the three channels (scaled
  by each channel's std) and the remaining constant offset is folded into the first BatchNorm's
  running mean (exact away from the zero padding at the border).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import torch
from rela_train.checkpoint import checkpoint_path, load_checkpoint
from rela_train.data.fashion_mnist import MEAN, STD, load_fashion_mnist
from rela_train.models import build_resnet
from rela_train.prior.loaders import NORMALIZATIONS

from rela_kernels.atomic_io import atomic_write

__all__ = [
    "random_prior_checkpoint",
    "rgb_prior_checkpoint",
    "save_state_dict",
    "write_class_subset",
]

_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of uint8 ``array``: magic 0x0803/0x0801 (uint8, ndim), then big-endian dims."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_class_subset(source_dir: str | None, out: Path, classes: tuple[int, ...]) -> Path:
    """Fashion-MNIST's train and test splits restricted to ``classes``, as IDX files in ``out``.

    Skipped when ``out`` is complete already (its files are written atomically, labels last).
    """
    if not classes or any(not 0 <= c <= 9 for c in classes):
        raise ValueError(f"classes: expected Fashion-MNIST classes 0-9, got {classes}")
    for split, (image_stem, label_stem) in _STEMS.items():
        if (out / label_stem).is_file() and (out / image_stem).is_file():
            continue
        images, labels, _ = load_fashion_mnist(source_dir, split)
        keep = torch.isin(labels, torch.tensor(classes))
        kept_images = images[keep][:, 0].numpy()
        kept_labels = labels[keep].numpy().astype(np.uint8)
        atomic_write(out / image_stem, lambda f, a=kept_images: f.write(_idx_bytes(a)))
        atomic_write(out / label_stem, lambda f, a=kept_labels: f.write(_idx_bytes(a)))
    return out


def _backbone_state(learner: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The online backbone's weights among a checkpoint's learner weights (keys ``P.conv1.weight``
    etc. for the one prefix ``P`` that names the online backbone, not the EMA target)."""
    prefixes = [
        key[: -len("conv1.weight")]
        for key in learner
        if key.endswith("conv1.weight") and "backbone" in key and "target" not in key
    ]
    prefixes = [p for p in prefixes if p.count(".") == min(q.count(".") for q in prefixes)]
    if len(prefixes) != 1:
        raise ValueError(
            f"{where}: expected one online backbone in the checkpoint's learner weights, found "
            f"{len(prefixes)} ({', '.join(prefixes) or 'none'})"
        )
    prefix = prefixes[0]
    return {key[len(prefix) :]: value for key, value in learner.items() if key.startswith(prefix)}


def rgb_prior_checkpoint(run_dir: Path, out: Path, normalization: str = "imagenet") -> Path:
    """Write the backbone of the finished run in ``run_dir`` as an RGB state dict at ``out``."""
    path = checkpoint_path(run_dir)
    learner = load_checkpoint(path, parts=("learner",))["learner"]
    if not isinstance(learner, dict):
        raise ValueError(f"{path}: not a rela-train checkpoint with learner weights")
    backbone = _backbone_state(learner, path)
    conv1 = backbone["conv1.weight"].to(torch.float64)
    if conv1.shape[1] != 1:
        raise ValueError(f"{path}: expected a one-channel (gray) backbone, got {conv1.shape[1]}")
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in NORMALIZATIONS[normalization])
    gray_mean, gray_std = MEAN[0], STD[0]
    # sum_c w_c (g - m_c) / s_c == w (g - M) / S  with  w_c = w s_c / (3 S), up to a constant:
    # w / S * (M - mean(m)), which the BatchNorm after the convolution absorbs.
    rgb = conv1 * std.view(1, 3, 1, 1) / (3 * gray_std)
    offset = conv1.sum(dim=(1, 2, 3)) * (gray_mean - mean.mean().item()) / gray_std
    converted = dict(backbone)
    converted["conv1.weight"] = rgb.to(backbone["conv1.weight"].dtype)
    running_mean = backbone["bn1.running_mean"].to(torch.float64)
    converted["bn1.running_mean"] = (running_mean + offset).to(backbone["bn1.running_mean"].dtype)

    return save_state_dict(converted, out)


def random_prior_checkpoint(arch: str, width: int, seed: int, out: Path) -> Path:
    """A randomly initialised small-image ResNet (RGB input) as a state dict at ``out``.

    ``random:ARCH`` priors have the standard width (64); this one has the transported prior's
    architecture and width, so that the two priors differ only in their weights. Skipped when
    ``out`` exists (same arguments, same network: the initialisation is seeded).
    """
    if out.is_file():
        return out
    # A private RNG state: the network depends on the seed only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_resnet(arch, small_images=True, width=width)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("fc.")}

    return save_state_dict(state, out)


def save_state_dict(state: dict[str, torch.Tensor], out: Path) -> Path:
    """Write a ResNet state dict where a ``checkpoint:ARCH:PATH`` prior reads it (atomically)."""

    def write(handle: io.BufferedWriter) -> None:
        torch.save(state, handle)

    atomic_write(out, write)
    return out
