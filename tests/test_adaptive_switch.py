"""``rk.AdaptiveSwitch``: the public EMA-plateau switch rule, the trainer's own rule."""

from __future__ import annotations

import math

import pytest
import torch
from rela_train.rela import build_switch

import rela_kernels as rk


def _losses(seed: int, n: int = 3000) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64)
    noise = 0.05 * torch.rand(n, generator=g, dtype=torch.float64)
    return (0.5 + 0.6 * torch.exp(-t / 80) + noise).tolist()


def _written_out(losses: list[float]) -> tuple[int | None, list[float]]:
    """The official rule written out independently: the 1-based switch step and every rho."""
    slow, fast, rhos = 2.0, 1.0, []
    for step, loss in enumerate(losses, start=1):
        rho = math.exp(-max(slow - fast, 0.0))
        rhos.append(rho)
        fast = 0.999 * fast + (1.0 - 0.999) * loss
        slow = 0.99 * slow + (1.0 - 0.99) * fast
        if rho >= 0.995:
            return step, rhos
    return None, rhos


@pytest.mark.parametrize("seed", [0, 1])
def test_the_public_rule_is_the_official_one_and_the_trainers(seed: int) -> None:
    losses = _losses(seed)
    expected, rhos = _written_out(losses)
    assert expected is not None and 100 < expected < len(losses)
    public, trainer = rk.AdaptiveSwitch(), build_switch("adaptive", total_steps=len(losses))
    fired = None
    for step, loss in enumerate(losses, start=1):
        a, b = public.update(loss), trainer.after_step(loss, step)
        assert a == b and public.state_dict() == trainer.state_dict()  # bit for bit
        if step <= expected:
            assert public.rho == rhos[step - 1]
        if a and fired is None:
            fired = step
    assert fired == expected and public.switched


def test_state_round_trip_freezes_after_the_switch_and_takes_tensors() -> None:
    rule = rk.AdaptiveSwitch()
    assert math.isnan(rule.rho) and not rule.switched
    for loss in (1.0, torch.tensor(0.9), 0.8):
        rule.update(loss)
    copy = rk.AdaptiveSwitch()
    copy.load_state_dict(rule.state_dict())
    assert copy == rule
    fired = rk.AdaptiveSwitch(threshold=0.3)  # exp(-(2 - 1)) = 0.37 >= 0.3 at once
    assert fired.update(5.0) and fired.state_dict() == (frozen := fired.state_dict())
    assert fired.update(0.0) and fired.state_dict() == frozen


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 0.0}, "threshold: expected a number in \\(0, 1\\], got 0.0"),
        ({"threshold": 1.5}, "threshold"),
        ({"fast_decay": 1.0}, "fast_decay: expected a number in \\[0, 1\\), got 1.0"),
        ({"slow_decay": -0.1}, "slow_decay"),
        ({"slow": math.inf}, "slow: expected a finite number, got inf"),
        ({"fast": math.nan}, "fast"),
    ],
)
def test_bad_constants_are_refused_naming_them(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rk.AdaptiveSwitch(**kwargs)
