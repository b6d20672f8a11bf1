"""What a run trains: the :class:`Learner` (BYOL with its target, the ReLA head, the online
linear probe) and the :class:`Objective`, one micro-batch's forward for the current phase."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

import rela_kernels as rk
from rela_train.byol import BYOL, byol_loss, hidden_width
from rela_train.config import TrainConfig
from rela_train.models import build_resnet
from rela_train.rela import ReLAHead, rela_loss

__all__ = ["Learner", "Objective", "build_learner", "frozen_statistics", "step_modules"]


@contextmanager
def frozen_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` normalise with batch statistics but leave their running
    statistics and batch counters as they were (a frozen backbone that still trains-mode)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]  # fmt: skip
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class Learner(nn.Module):
    """Everything trained: BYOL (with its target), the ReLA head, the online linear probe."""

    def __init__(self, config: TrainConfig, channels: int, num_classes: int, rela_dim: int | None):
        super().__init__()
        backbone = build_resnet(
            config.arch, small_images=config.small_images, width=config.width, in_channels=channels
        )
        self.feature_dim = backbone.feature_dim
        hidden = hidden_width(config.proj_hidden_rule, config.proj_hidden, self.feature_dim)
        self.byol = BYOL(backbone, self.feature_dim, hidden, config.proj_dim)
        self.rela_head = (
            ReLAHead(self.feature_dim, rela_dim, frozen=config.rela_head == "frozen")
            if rela_dim is not None
            else None
        )
        self.probe = nn.Linear(self.feature_dim, num_classes)


def build_learner(
    config: TrainConfig, channels: int, num_classes: int, rela_dim: int | None
) -> Learner:
    """The model of a run, initialised from ``config.seed`` (without touching global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return Learner(config, channels, num_classes, rela_dim)


def step_modules(
    learner: Learner, phase: str, *, blend: bool, freeze_backbone: bool
) -> dict[str, nn.Module]:
    """The modules :class:`Objective`'s forward runs in one kind of step, by name: every
    parameter among them that requires a gradient receives one (what data parallelism wraps,
    :mod:`rela_train.parallel`). ``blend``: the ReLA loss is weighted in (a BYOL-phase step of a
    ``blend`` transition); ``freeze_backbone``: the backbone runs without gradient."""
    byol = learner.byol
    modules: dict[str, nn.Module] = {}
    if not freeze_backbone:
        modules["backbone"] = byol.backbone
    if phase == "byol":
        # The target runs too (no gradient): its BatchNorm buffers follow rank 0's as before.
        modules.update(
            projector=byol.projector,
            predictor=byol.predictor,
            target_backbone=byol.target_backbone,
            target_projector=byol.target_projector,
        )
    if (phase == "rela" or blend) and learner.rela_head is not None:
        modules["rela_head"] = learner.rela_head
    modules["probe"] = learner.probe
    return modules


class Objective(nn.Module):
    """One micro-batch's forward for the current phase: what DistributedDataParallel wraps, so
    that its gradient all-reduce overlaps the backward pass."""

    def __init__(self, learner: Learner, target_map: rk.Transport | None) -> None:
        super().__init__()
        self.learner = learner
        # The transport that maps prior embeddings to ReLA targets. A plain attribute, not an
        # input: DDP would try to move (rebuild) forward's inputs.
        self.target_map = target_map

    def forward(
        self,
        views: list[torch.Tensor],
        phase: str,
        prior: torch.Tensor | None,
        check: bool,
        *,
        rela_weight: float = 0.0,
        freeze_backbone: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(per-sample loss, score in [0, 2], probe logits)``.

        In the BYOL phase, ``rela_weight > 0`` (a ``blend`` transition) adds the ReLA loss:
        ``rela_weight * ReLA + (1 - rela_weight) * BYOL``, on the same views; ``freeze_backbone``
        (``warm-heads``) computes the features without gradient and leaves BatchNorm's running
        statistics as they are (:func:`frozen_statistics`)."""
        byol = self.learner.byol
        if freeze_backbone:
            with torch.no_grad(), frozen_statistics(byol.backbone):
                f1 = byol.backbone(views[0])
                f2 = byol.backbone(views[1])
        else:
            f1 = byol.backbone(views[0])
            f2 = byol.backbone(views[1])
        if phase == "rela":
            per_sample = self._rela(f1, f2, prior, check)
            score = per_sample  # in [0, 2]
        else:
            q1, q2 = byol.predict(f1), byol.predict(f2)
            z1, z2 = byol.target(views[0]), byol.target(views[1])
            per_sample = byol_loss((q1, q2), (z1, z2), check_finite=check)
            score = per_sample / 4.0  # two 2 - 2cos terms: back to [0, 2], as ReLA's
            if rela_weight > 0:
                rela = self._rela(f1, f2, prior, check)
                per_sample = rela_weight * rela + (1.0 - rela_weight) * per_sample
                score = rela_weight * rela + (1.0 - rela_weight) * score
        logits = self.learner.probe(f1.detach().float())
        return per_sample, score, logits

    def _rela(
        self, f1: torch.Tensor, f2: torch.Tensor, prior: torch.Tensor | None, check: bool
    ) -> torch.Tensor:
        head, target_map = self.learner.rela_head, self.target_map
        assert head is not None and prior is not None and target_map is not None
        return rela_loss((head(f1), head(f2)), prior, target_map, check_finite=check)
