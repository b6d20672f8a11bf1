"""ReLA-F: the linear head, the transported cosine loss, and the switch to BYOL.

During the ReLA phase the backbone ``h`` and a linear head ``W`` regress each view onto the
sample's transported prior embedding ``y = transport(p)``:
``loss_i = 0.5 * sum_views (1 - cos(W h(x_v), y_i))``, computed by the fused
:func:`rela_kernels.transported_cosine_loss` (the targets ``y`` are never materialised).

A switch rule decides, after every optimizer step, whether to move to BYOL, once and for good:

* ``adaptive`` -- the official EMA plateau test, :class:`rela_kernels.AdaptiveSwitch`, fed the
  step's loss (the cross-rank mean): ``rho = exp(-max(slow - fast, 0))`` from the EMAs before
  the step's update; switch when ``rho >= 0.995``.
* ``const:F`` -- with ``--const-switch step`` (this project's): switch after
  ``round(F * total_steps)`` optimizer steps; with ``--const-switch epoch`` (the official code,
  ``boostor/rela.py``: ``current_epoch < int(conlam * epochs)``): train ReLA for epochs
  ``0 .. floor(F * epochs) - 1`` and switch when epoch ``floor(F * epochs)`` starts.
* ``never`` -- ReLA for the whole run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import rela_kernels as rk
from rela_train.config import parse_switch

__all__ = [
    "AdaptiveSwitch",
    "ConstSwitch",
    "EpochSwitch",
    "NeverSwitch",
    "ReLAHead",
    "Switch",
    "build_switch",
    "rela_loss",
    "rela_dim_cap",
]


class ReLAHead(nn.Linear):
    """``W``: backbone features -> the transport's width ``d``.

    ``frozen=True`` keeps the random initialisation (no gradient, not in the optimizer), as the
    official code effectively does.
    """

    def __init__(self, feature_dim: int, dim: int, *, frozen: bool = False) -> None:
        super().__init__(feature_dim, dim)
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)


def rela_loss(
    predictions: tuple[torch.Tensor, torch.Tensor],
    prior: torch.Tensor,
    transport: rk.Transport,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """Per-sample ReLA-F loss ``[B]``: ``0.5 * sum_v (1 - cos(z_v, transport(prior)))``.

    ``predictions``: the head outputs ``W h(x_v)`` of the two views ``[B, d]``; ``prior``: the
    batch's stored prior embeddings ``[B, D]``.
    """
    z1, z2 = predictions
    first = rk.transported_cosine_loss(z1, prior, transport, check_finite=check_finite)
    second = rk.transported_cosine_loss(z2, prior, transport, check_finite=check_finite)
    return 0.5 * (first + second)


# ----------------------------------------------------------------------------------------------
# Switch rules
# ----------------------------------------------------------------------------------------------


class Switch:
    """Base: ``switched`` becomes True once and stays; ``rho`` is the last plateau statistic."""

    switched: bool = False
    rho: float = math.nan

    def before_epoch(self, epoch: int) -> bool:
        """Called at the start of every epoch; returns ``switched``."""
        return self.switched

    def after_step(self, loss: float, step: int) -> bool:
        """Called after every optimizer step of the ReLA phase with its (global mean) loss and
        the number of optimizer steps done so far."""
        return self.switched

    def state_dict(self) -> dict:
        return {"switched": self.switched, "rho": self.rho}

    def load_state_dict(self, state: dict) -> None:
        self.switched = bool(state["switched"])
        self.rho = float(state["rho"])


class AdaptiveSwitch(rk.AdaptiveSwitch, Switch):
    """The official EMA plateau rule, :class:`rela_kernels.AdaptiveSwitch`, as a trainer
    :class:`Switch` (the step number is not used)."""

    def after_step(self, loss: float, step: int = 0) -> bool:
        return self.update(loss)


class ConstSwitch(Switch):
    """Switch after ``round(fraction * total_steps)`` optimizer steps (at once if that is 0)."""

    def __init__(self, fraction: float, total_steps: int) -> None:
        self.switch_after = round(fraction * total_steps)
        self.switched = self.switch_after <= 0

    def after_step(self, loss: float, step: int) -> bool:
        if step >= self.switch_after:
            self.switched = True
        return self.switched


class EpochSwitch(Switch):
    """Switch when epoch ``floor(fraction * epochs)`` starts (at once if that is 0): the
    official code's ``const`` rule."""

    def __init__(self, fraction: float, epochs: int) -> None:
        # The float product, floored, exactly as the official int(conlam * epochs).
        self.switch_epoch = math.floor(fraction * epochs)
        self.switched = self.switch_epoch <= 0

    def before_epoch(self, epoch: int) -> bool:
        if epoch >= self.switch_epoch:
            self.switched = True
        return self.switched


class NeverSwitch(Switch):
    """ReLA for the whole run."""


def build_switch(
    text: str, total_steps: int, *, const_switch: str = "step", epochs: int | None = None
) -> Switch:
    """The rule for ``--switch`` (``adaptive``, ``const:F``, ``never``); ``const_switch``
    (``step`` or ``epoch``, which needs ``epochs``) chooses the semantics of ``const:F``."""
    kind, fraction = parse_switch(text)
    if kind == "adaptive":
        return AdaptiveSwitch()
    if kind == "const":
        assert fraction is not None
        if const_switch == "epoch":
            if epochs is None:
                raise ValueError("--const-switch epoch: the number of epochs is needed")
            return EpochSwitch(fraction, epochs)
        if const_switch != "step":
            raise ValueError(f"--const-switch: expected step or epoch, got {const_switch!r}")
        return ConstSwitch(fraction, total_steps)
    return NeverSwitch()


def rela_dim_cap(rule: str, rela_dim: int, feature_dim: int) -> int:
    """The cap on the width a computed prior is transported to (``--rela-dim-rule``): ``fixed``
    is ``--rela-dim``; ``min-width`` is the backbone's feature width. The prior's width and row
    count cap it further (:func:`rela_train.prior.embedding.transport_width`), so ``min-width``
    gives the official code's ``boostor/rela.py`` ``_pca_reduce(Y, min(feature_dim,
    Y.shape[-1]))``."""
    if rule == "fixed":
        return rela_dim
    if rule == "min-width":
        return feature_dim
    raise ValueError(f"--rela-dim-rule: expected fixed or min-width, got {rule!r}")
