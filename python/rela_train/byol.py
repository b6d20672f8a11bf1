"""BYOL (Grill et al. 2020): online network, EMA target, projector and predictor, the loss.

The online network is ``backbone -> projector -> predictor``; the target network is an EMA copy of
``backbone -> projector`` that receives no gradients. For two views ``v1, v2`` the per-sample loss
is ``(2 - 2 cos(q(v1), z'(v2))) + (2 - 2 cos(q(v2), z'(v1)))``, summed over the two view pairs,
with ``q`` the online prediction and ``z'`` the target projection.

The cosine terms go through :func:`rela_kernels.cosine_loss` (``1 - cos``, gradient to the first
argument only), which is exactly BYOL's stop-gradient on the target.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import rela_kernels as rk

__all__ = ["BYOL", "MLP", "byol_loss", "hidden_width"]


def hidden_width(rule: str, proj_hidden: int, feature_dim: int) -> int:
    """Projector/predictor hidden width for ``--proj-hidden-rule``: ``fixed`` is
    ``--proj-hidden``; ``double`` is twice the backbone's feature width (the official ReLA code,
    ``methods/byol.py``)."""
    if rule == "fixed":
        return proj_hidden
    if rule == "double":
        return 2 * feature_dim
    raise ValueError(f"--proj-hidden-rule: expected fixed or double, got {rule!r}")


class MLP(nn.Sequential):
    """BYOL's projector/predictor: Linear -> BatchNorm -> ReLU -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class BYOL(nn.Module):
    """Online backbone, projector and predictor, plus the EMA target backbone and projector.

    Args:
        backbone: maps images to ``[B, feature_dim]`` features through its ``forward`` (our
            ResNets built with ``num_classes=0``), so ``backbone.compile()`` applies.
        feature_dim: width of the backbone's features.
        hidden_dim, out_dim: projector/predictor widths (BYOL: 4096 and 256).
    """

    def __init__(
        self, backbone: nn.Module, feature_dim: int, hidden_dim: int = 4096, out_dim: int = 256
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = MLP(feature_dim, hidden_dim, out_dim)
        self.predictor = MLP(out_dim, hidden_dim, out_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for parameter in self.target_parameters():
            parameter.requires_grad_(False)

    def target_parameters(self) -> list[nn.Parameter]:
        return [*self.target_backbone.parameters(), *self.target_projector.parameters()]

    def online_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector, self.predictor]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of the online network (what evaluation and ReLA use)."""
        return self.backbone(x)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Online prediction ``q(g(features))``."""
        return self.predictor(self.projector(features))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Target projection of ``x`` (no gradient)."""
        return self.target_projector(self.target_backbone(x))

    @torch.no_grad()
    def reset_target(self) -> None:
        """The target backbone and projector become exact copies of the online ones
        (``--switch-transition reset-target``)."""
        self.target_backbone.load_state_dict(self.backbone.state_dict())
        self.target_projector.load_state_dict(self.projector.state_dict())

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """``target <- tau * target + (1 - tau) * online`` for parameters and float buffers;
        integer buffers (BatchNorm's batch counter) are copied."""
        online = [self.backbone, self.projector]
        target = [self.target_backbone, self.target_projector]
        t_params = [p for m in target for p in m.parameters()]
        o_params = [p for m in online for p in m.parameters()]
        t_float = [b for m in target for b in m.buffers() if b.is_floating_point()]
        o_float = [b for m in online for b in m.buffers() if b.is_floating_point()]
        if t_params:
            torch._foreach_lerp_(t_params, o_params, 1.0 - tau)
        if t_float:
            torch._foreach_lerp_(t_float, o_float, 1.0 - tau)
        for m_t, m_o in zip(target, online, strict=True):
            for b_t, b_o in zip(m_t.buffers(), m_o.buffers(), strict=True):
                if not b_t.is_floating_point():
                    b_t.copy_(b_o)


def byol_loss(
    predictions: tuple[torch.Tensor, torch.Tensor],
    targets: tuple[torch.Tensor, torch.Tensor],
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """Per-sample symmetric BYOL loss ``[B]`` (float32), each term ``2 - 2 cos``.

    ``predictions = (q1, q2)`` are the online predictions of views 1 and 2, ``targets = (z1, z2)``
    the target projections; view 1's prediction is matched with view 2's target and vice versa.
    Gradients flow to the predictions only.
    """
    q1, q2 = predictions
    z1, z2 = targets
    first = rk.cosine_loss(q1, z2.detach(), check_finite=check_finite)
    second = rk.cosine_loss(q2, z1.detach(), check_finite=check_finite)
    return 2.0 * (first + second)
