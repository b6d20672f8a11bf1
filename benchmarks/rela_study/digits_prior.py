"""A prior from another distribution: a small ResNet trained on scikit-learn's handwritten digits.

scikit-learn ships the 1,797 8x8 gray digits of the UCI set inside its wheel, so this prior needs
no download. The network is the study's prior architecture (``resnet10``, width 32, the
small-image stem) and is trained *supervised* (cross-entropy on the ten digit classes): with
1,437 training images BYOL has too little data to learn much, and a supervised network is the
kind of "free" prior the paper has in mind (its CIFAR-10 -> ImageNet prior is a trained ResNet-18).

It sees the digits exactly as a ``checkpoint:`` prior later sees Fashion-MNIST (the rule in
``rela_train.prior``): gray repeated to RGB, resized (bilinear) to the prior's 32-px input, with
ImageNet's normalisation. The file holds the backbone's state dict without the classifier, so
``--prior checkpoint:resnet10:PATH`` loads it like any user's network.

Where it differs from the paper's CIFAR-10 -> ImageNet setting: the source images are 8 x 8 (the
target's are 28 x 28; CIFAR's 32 x 32 against ImageNet's 224 x 224), both are one-channel (the
paper's are RGB), and the source has 1,797 images against the target's 18,000 (CIFAR-10 has
50,000 against ImageNet's 1.28 M).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rela_study.transport import save_state_dict
from rela_train.models import build_resnet
from rela_train.prior.loaders import NORMALIZATIONS

from rela_kernels.atomic_io import atomic_write_text

__all__ = ["DIGITS_ARCH", "DIGITS_WIDTH", "digits_images", "train_digits_prior"]

DIGITS_ARCH, DIGITS_WIDTH = "resnet10", 32
# The checkpoint prior of a small-image ResNet embeds at 32 px (rela_train.prior.loaders).
INPUT_SIZE = 32
HOLDOUT = 0.2


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as float ``[N, 3, 32, 32]`` prior inputs and int64 ``[N]`` labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit(
            "the digits prior needs scikit-learn (its bundled digits): pip install scikit-learn"
        ) from error
    digits = load_digits()
    # Pixel values are ink intensities 0..16: bright strokes on a dark ground, like
    # Fashion-MNIST's bright garments on black.
    gray = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
    rgb = F.interpolate(gray, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear").expand(-1, 3, -1, -1)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in
                 NORMALIZATIONS["imagenet"])  # fmt: skip
    return (rgb - mean) / std, torch.from_numpy(np.asarray(digits.target, dtype=np.int64))


def _shifted(images: torch.Tensor, generator: torch.Generator, pad: int = 3) -> torch.Tensor:
    """Each image translated by up to ``pad`` pixels (edge padding): the one augmentation."""
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * pad + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + INPUT_SIZE, dx : dx + INPUT_SIZE]
    return out


def train_digits_prior(
    out: Path, *, seed: int = 0, epochs: int = 15, batch_size: int = 64, log=print
) -> dict[str, Any]:
    """Train the digits prior and write its backbone to ``out`` (atomically) with a JSON note
    beside it (``out`` + ``.json``: held-out accuracy, sizes, seed). Skipped, returning the note,
    when both exist: the training is seeded, so the same arguments give the same network."""
    note_path = out.with_name(out.name + ".json")
    if out.is_file() and note_path.is_file():
        return json.loads(note_path.read_text(encoding="utf-8"))
    images, labels = digits_images()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    cut = round(len(images) * (1 - HOLDOUT))
    train, held = order[:cut], order[cut:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_resnet(DIGITS_ARCH, small_images=True, width=DIGITS_WIDTH, num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        model.train()
        shuffled = train[torch.randperm(len(train), generator=generator)]
        total = 0.0
        for start in range(0, len(shuffled), batch_size):
            batch = shuffled[start : start + batch_size]
            loss = F.cross_entropy(model(_shifted(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        log(f"digits prior: epoch {epoch + 1}/{epochs}, loss {total / len(train):.4f}")
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[held]).argmax(1) == labels[held]).float().mean().item()
    save_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, out)
    note = {
        "arch": DIGITS_ARCH,
        "width": DIGITS_WIDTH,
        "stem": "small-image",
        "input_size": INPUT_SIZE,
        "training": "supervised cross-entropy, Adam 1e-3, shifts of up to 3 px",
        "epochs": epochs,
        "seed": seed,
        "train_images": len(train),
        "held_out_images": len(held),
        "held_out_accuracy": round(accuracy, 4),
    }
    atomic_write_text(note_path, json.dumps(note, indent=1) + "\n")
    log(f"digits prior: held-out accuracy {100 * accuracy:.2f}% -> {out}")
    return note
