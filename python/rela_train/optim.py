"""LARS, parameter groups and the per-step schedules (learning rate and target EMA).

Schedules are pure functions of the optimizer step, so a resumed run recomputes them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "LARS",
    "build_optimizer",
    "cosine_ema_tau",
    "ema_tau",
    "lr_factor",
    "lr_scale",
    "scheduled_lr_factor",
    "parameter_groups",
    "set_learning_rates",
]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as BYOL uses it.

    Per parameter ``w`` with gradient ``g``, unless its group sets ``lars_exclude``:
    ``g <- g + weight_decay * w``, then ``g <- g * eta * ||w|| / ||g||`` (when both norms are
    positive). Excluded groups (biases and normalisation parameters) get neither weight decay
    nor the trust ratio: plain momentum SGD. Then ``v <- momentum * v + g``, ``w <- w - lr * v``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(
                f"LARS: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1, eta > 0; got "
                f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}, eta={eta}"
            )
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            exclude = group["lars_exclude"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if not exclude:
                    if group["weight_decay"]:
                        g = g.add(w, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(w)
                    g_norm = torch.linalg.vector_norm(g)
                    # A tensor expression instead of a Python branch: no host sync on CUDA.
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["eta"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    g = g.mul(trust)
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                w.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _is_excluded(name: str, parameter: torch.Tensor) -> bool:
    # Biases and BatchNorm/LayerNorm scales and shifts are the 1-D parameters.
    return parameter.ndim <= 1 or name.endswith(".bias")


def parameter_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    tag: str,
    decay_exclude: str = "bias-norm",
) -> list[dict]:
    """Two groups of ``model``'s trainable parameters: regular, and biases/norms (never adapted
    by LARS). ``decay_exclude`` ``bias-norm`` spares the second group from weight decay (BYOL's
    convention); ``none`` decays it too (the official ReLA code hands AdamW every parameter).
    ``tag`` names the groups (``base_lr`` is kept per group so the schedule can rescale each)."""
    if decay_exclude not in ("bias-norm", "none"):
        raise ValueError(f"decay_exclude: expected bias-norm or none, got {decay_exclude!r}")
    regular, excluded = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (excluded if _is_excluded(name, parameter) else regular).append(parameter)
    groups = []
    if regular:
        groups.append(dict(params=regular, weight_decay=weight_decay, lars_exclude=False, name=tag))
    if excluded:
        groups.append(
            dict(
                params=excluded,
                weight_decay=weight_decay if decay_exclude == "none" else 0.0,
                lars_exclude=True,
                name=f"{tag}.bias_norm",
            )
        )
    for group in groups:
        group["base_lr"] = base_lr
        group["lr"] = base_lr
    return groups


def build_optimizer(
    kind: str,
    groups: list[dict],
    *,
    weight_decay: float,
    momentum: float = 0.9,
    eta: float = 0.001,
) -> torch.optim.Optimizer:
    """``lars`` (BYOL's choice) or ``adamw`` over ready-made parameter groups."""
    if kind == "lars":
        return LARS(groups, lr=0.0, weight_decay=weight_decay, momentum=momentum, eta=eta)
    if kind == "adamw":
        # AdamW ignores lars_exclude; the per-group weight_decay says which groups decay.
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; known: lars, adamw")


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from ~0 to 1 over ``warmup_steps``, then cosine decay to 0 at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rates(
    optimizer: torch.optim.Optimizer, factor: float, *, fixed: Iterable[str] = ()
) -> None:
    """Every group's ``lr = base_lr * factor``; groups whose name is in ``fixed`` keep base_lr."""
    fixed = set(fixed)
    for group in optimizer.param_groups:
        name = group.get("name", "")
        keep = any(name == f or name.startswith(f + ".") for f in fixed)
        group["lr"] = group["base_lr"] if keep else group["base_lr"] * factor


def cosine_ema_tau(step: int, total_steps: int, base: float = 0.99) -> float:
    """BYOL's target decay: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``.

    ``base`` at step 0, rising to exactly 1.0 at ``total_steps``.
    """
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def scheduled_lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning-rate multiplier of ``--lr-schedule``: ``cosine`` is :func:`lr_factor`
    (warmup, then cosine decay); ``constant`` is 1 throughout (the official ReLA code)."""
    if schedule == "cosine":
        return lr_factor(step, total_steps, warmup_steps)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"--lr-schedule: expected cosine or constant, got {schedule!r}")


def lr_scale(scaling: str, images_per_step: int) -> float:
    """The multiplier of ``--lr`` for ``--lr-scaling``: ``linear`` is the effective batch / 256
    (Goyal et al.), ``none`` is 1 (the official ReLA code)."""
    if scaling == "linear":
        return images_per_step / 256
    if scaling == "none":
        return 1.0
    raise ValueError(f"--lr-scaling: expected linear or none, got {scaling!r}")


def ema_tau(schedule: str, step: int, total_steps: int, base: float) -> float:
    """The target decay of ``--tau-schedule``: ``cosine`` is :func:`cosine_ema_tau`,
    ``constant`` is ``base`` throughout (the official ReLA code's 0.99)."""
    if schedule == "cosine":
        return cosine_ema_tau(step, total_steps, base)
    if schedule == "constant":
        return base
    raise ValueError(f"--tau-schedule: expected cosine or constant, got {schedule!r}")
