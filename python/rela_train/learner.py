"""What a run trains: the :class:`Learner` (BYOL with its target, the ReLA head, the online
linear probe) and the :class:`Objective`, one micro-batch's forward for the current phase."""

from __future__ import annotations

import torch
from torch import nn

import rela_kernels as rk
from rela_train.byol import BYOL, byol_loss, hidden_width
from rela_train.config import TrainConfig
from rela_train.models import build_resnet
from rela_train.rela import ReLAHead, rela_loss

__all__ = ["Learner", "Objective", "build_learner"]


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
        self, views: list[torch.Tensor], phase: str, prior: torch.Tensor | None, check: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(per-sample loss, score in [0, 2], probe logits)``."""
        byol = self.learner.byol
        target_map = self.target_map
        f1 = byol.backbone(views[0])
        f2 = byol.backbone(views[1])
        if phase == "rela":
            head = self.learner.rela_head
            assert head is not None and prior is not None and target_map is not None
            per_sample = rela_loss((head(f1), head(f2)), prior, target_map, check_finite=check)
            score = per_sample  # in [0, 2]
        else:
            q1, q2 = byol.predict(f1), byol.predict(f2)
            z1, z2 = byol.target(views[0]), byol.target(views[1])
            per_sample = byol_loss((q1, q2), (z1, z2), check_finite=check)
            score = per_sample / 4.0  # two 2 - 2cos terms: back to [0, 2], as ReLA's
        logits = self.learner.probe(f1.detach().float())
        return per_sample, score, logits
