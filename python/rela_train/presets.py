"""Named starting points for :class:`~rela_train.config.TrainConfig` (``--preset NAME``) and
the recipes (``--recipe NAME``).

A preset only changes defaults; every flag given on the command line still wins. A recipe is
applied after the flags, to the settings they did not give.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rela_train.config import TrainConfig

__all__ = ["OFFICIAL_RECIPE", "PRESETS", "apply_recipe", "get_preset"]

# ResNet-18 with the small-image stem (3x3 stride-1, no max-pool) for 32-64 px image folders.
_SMALL_IMAGES_R18: dict[str, Any] = dict(
    dataset="folder",
    arch="resnet18",
    small_images=True,
    proj_hidden=4096,
    proj_dim=256,
    epochs=200,
    batch_size=256,
    lr=1.0,
    weight_decay=1e-5,
    warmup_epochs=10.0,
    ema_base=0.99,
    rela_dim=128,
)

# Fashion-MNIST (28 px, 1 channel) with the small-image stem and a 128-d projector.
_FASHION_MNIST: dict[str, Any] = dict(
    dataset="fashion-mnist",
    small_images=True,
    proj_dim=128,
    lr=1.0,
    weight_decay=1e-5,
    rela_dim=64,
)

# A ResNet-10 with the small-image stem and a short warmup, for runs on a CPU.
_SMALL_CPU: dict[str, Any] = dict(
    arch="resnet10",
    small_images=True,
    weight_decay=1e-5,
    warmup_epochs=0.5,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's job: ResNet-50 BYOL on ImageNet-1K at 224 px (Grill et al. 2020; ReLA's
    # ImageNet runs): LARS at 0.45 x global batch / 256, weight decay 1e-6, 10 warmup epochs,
    # target EMA 0.99 -> 1, 4096/256 projector and predictor, global batch 4096 (256 per GPU,
    # accumulated as needed: 2 micro-batches on one 8-GPU node, 1 on two nodes), 100 epochs.
    # bf16 autocast, channels_last and SyncBN are on by default on CUDA. For ReLA add
    # --prior SPEC (or --prior-store DIR) and --budget 0.1|0.2|0.5.
    "imagenet-r50-byol": dict(
        dataset="folder",
        image_size=224,
        load_size=256,
        workers=10,
        prefetch=4,
        arch="resnet50",
        width=64,
        proj_hidden=4096,
        proj_dim=256,
        epochs=100,
        batch_size=256,
        global_batch=4096,
        optimizer="lars",
        lr=0.45,
        weight_decay=1e-6,
        warmup_epochs=10.0,
        ema_base=0.99,
        rela_dim=256,
        eval_bank=100_000,
        probe_epochs=100,
    ),
    # CIFAR-10/100 folders (32 px): ResNet-18 with the small-image stem, the common BYOL
    # recipe for small images (LARS 1.0 x B/256, weight decay 1e-5, batch 256).
    "cifar-r18": dict(_SMALL_IMAGES_R18, image_size=32, load_size=32, workers=4),
    # Tiny-ImageNet folders (64 px, 200 classes): the same recipe at 64 px.
    "tiny-imagenet-r18": dict(_SMALL_IMAGES_R18, image_size=64, load_size=64, workers=6),
    # Fashion-MNIST at full size on a CPU or a small GPU.
    "fashion-mnist": dict(
        _FASHION_MNIST,
        image_size=28,
        arch="resnet18",
        width=32,
        proj_hidden=1024,
        epochs=50,
        batch_size=256,
        warmup_epochs=5.0,
        eval_bank=20000,
    ),
    # `rela-train demo`: sized to train two runs plus evaluation on a CPU (README, "make demo",
    # has the measured figures).
    "fashion-mnist-demo": dict(
        _FASHION_MNIST,
        **_SMALL_CPU,
        image_size=16,
        width=16,
        proj_hidden=512,
        epochs=3,
        batch_size=128,
        ema_base=0.99,
        eval_bank=10000,
        probe_epochs=100,
        channels_last=True,
        threads=2,
    ),
    # Tests: tiny synthetic data on one core.
    "synthetic-test": dict(
        _SMALL_CPU,
        dataset="synthetic",
        image_size=12,
        width=4,
        proj_hidden=32,
        proj_dim=16,
        epochs=2,
        batch_size=16,
        lr=0.5,
        rela_dim=8,
        knn_k=10,
        probe_epochs=20,
        threads=1,
        progress=False,
    ),
}


def get_preset(name: str | None) -> TrainConfig:
    """The configuration of preset ``name`` (the plain defaults for ``None``)."""
    if name is None:
        return TrainConfig().validate()
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    config = TrainConfig(**PRESETS[name])
    if config.dataset != "folder":
        config.validate()  # folder presets are complete only once --data-dir is given
    return config


# The official ReLA code (LINs-lab/ReLA): methods/byol.py BYOL.configure_optimizers (AdamW, no
# scheduler), main.py get_parser (lr 1e-3, weight decay 0.01), methods/byol.py (tau 0.99,
# hidden width 2 x feature width; TransformBYOL: no blur for CIFAR), boostor/rela.py (head not
# optimised, PCA to min(feature width, prior width), const switch by epoch, Resize + CenterCrop
# + ImageNet normalisation), metrics/lineareval.py (the probe).
OFFICIAL_RECIPE: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.01,
    # BYOL.configure_optimizers hands AdamW every parameter: biases and norms are decayed too.
    "decay_exclude": "none",
    "lr_schedule": "constant",
    "lr_scaling": "none",
    "tau_schedule": "constant",
    "ema_base": 0.99,
    "proj_hidden_rule": "double",
    "rela_head": "frozen",
    "rela_dim_rule": "min-width",
    "const_switch": "epoch",
    "prior_preprocess": "official",
    "probe": "official",
    "probe_epochs": 100,
    "switch_transition": "hard",
}

# The official code turns blur off for CIFAR (32 px) only.
_OFFICIAL_BLUR_MAX_SIZE = 32


def apply_recipe(
    config: TrainConfig, explicit: set[str] | frozenset[str] = frozenset()
) -> TrainConfig:
    """``config`` with its ``recipe``'s settings applied to every field not in ``explicit``
    (the fields the user set: they win). ``default`` changes nothing."""
    if config.recipe == "default":
        return config.validate()
    values = dict(OFFICIAL_RECIPE)
    values["byol_blur"] = "off" if config.image_size <= _OFFICIAL_BLUR_MAX_SIZE else "on"
    changes = {name: value for name, value in values.items() if name not in explicit}
    return dataclasses.replace(config, **changes).validate()
