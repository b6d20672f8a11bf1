"""Non-finite inputs are refused with one line naming the argument: ``p`` of rk.transport, the
``weight`` of both losses, and a Transport whose values overflow float32 when cast."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import usable_backends

import rela_kernels as rk

BAD = [math.nan, math.inf, -math.inf]


def transport_of(generator: torch.Generator, dp: int = 6, d: int = 3) -> rk.Transport:
    mean = torch.randn(dp, generator=generator)
    return rk.Transport(mean, torch.randn(dp, d, generator=generator))


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("value", BAD)
def test_transport_names_a_non_finite_p(
    generator: torch.Generator, backend: str, value: float
) -> None:
    t = transport_of(generator)
    p = torch.randn(5, 6, generator=generator)
    row, col = (int(v) for v in torch.randint(0, 5, (2,), generator=generator))
    p[row, col] = value
    with pytest.raises(ValueError) as caught:
        rk.transport(p, t, backend=backend)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("rk.transport: p must be finite")
    # Opting out (as for the losses) returns the propagated non-finite values.
    assert not torch.isfinite(rk.transport(p, t, backend=backend, check_finite=False)).all()
    p[row, col] = 0.0
    assert torch.isfinite(rk.transport(p, t, backend=backend)).all()


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("value", BAD)
def test_losses_name_a_non_finite_weight(
    generator: torch.Generator, backend: str, value: float
) -> None:
    t = transport_of(generator)
    z = torch.randn(4, 3, generator=generator)
    y = torch.randn(4, 3, generator=generator)
    p = torch.randn(4, 6, generator=generator)
    weight = torch.rand(4, generator=generator)
    weight[int(torch.randint(0, 4, (1,), generator=generator))] = value
    calls = {
        "rk.cosine_loss": lambda **kw: rk.cosine_loss(z, y, backend=backend, **kw),
        "rk.transported_cosine_loss": lambda **kw: rk.transported_cosine_loss(
            z, p, t, backend=backend, **kw
        ),
    }
    for where, call in calls.items():
        for reduction in ("none", "sum", "mean"):
            with pytest.raises(ValueError) as caught:
                call(weight=weight, reduction=reduction)
            assert str(caught.value) == f"{where}: weight must be finite, got 1 non-finite value(s)"
        finite = weight.nan_to_num(0.0, 0.0, 0.0)
        assert torch.isfinite(call(weight=finite, reduction="sum"))
        call(weight=weight, reduction="none", check_finite=False)  # opted out: no error


@pytest.mark.parametrize("name", ["mean", "matrix", "bias"])
def test_transport_checks_values_after_the_float32_cast(name: str) -> None:
    values = {
        "mean": torch.zeros(3, dtype=torch.float64),
        "matrix": torch.eye(3, 2, dtype=torch.float64),
        "bias": torch.zeros(2, dtype=torch.float64),
    }
    values[name].view(-1)[0] = 1e300  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=rf"^rk.Transport: {name} must be finite"):
        rk.Transport(values["mean"], values["matrix"], values["bias"])
    t = rk.Transport(torch.zeros(3), torch.eye(3, 2))
    before = {k: v.clone() for k, v in t.state_dict().items() if v is not None}
    with pytest.raises(ValueError, match=name):
        t.load_state_dict(values)
    assert all(torch.equal(before[k], getattr(t, k)) for k in before)  # left unchanged
    values[name].view(-1)[0] = 3e38  # within float32's range: accepted
    rk.Transport(values["mean"], values["matrix"], values["bias"])
