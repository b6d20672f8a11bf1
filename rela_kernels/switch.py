"""The adaptive switch: when to leave the ReLA phase (the official EMA-plateau rule).

ReLA-F regresses the backbone onto the transported prior targets early in training, then moves
to the run's own objective (BYOL in the paper) once and for good. The official code
(LINs-lab/ReLA, ``boostor/rela.py``) decides the moment with two exponential moving averages of
the step loss ``L``: after every optimizer step of the ReLA phase,

* ``rho = exp(-max(slow - fast, 0))`` is computed first, from the averages *before* this step;
* then ``fast <- fast_decay * fast + (1 - fast_decay) * L`` and
  ``slow <- slow_decay * slow + (1 - slow_decay) * fast``;
* the rule fires once ``rho >= threshold``.

``fast`` follows the loss slowly (0.999) and ``slow`` follows ``fast`` faster (0.99), starting
from ``slow = 2`` and ``fast = 1`` (the cosine loss lies in [0, 2]). While the loss falls, ``slow``
stays above ``fast`` and ``rho < 1``; once the loss plateaus the gap closes and ``rho`` reaches
the threshold. Under DDP, feed every rank the same (all-reduced) loss so that all ranks switch at
the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["AdaptiveSwitch"]


@dataclass
class AdaptiveSwitch:
    """The official EMA-plateau switch rule; see the module docstring.

    ``update(loss)`` after each ReLA-phase step returns ``switched``, which becomes True once and
    stays (the state is frozen from then on). ``rho`` is the last plateau statistic (NaN before
    the first update). ``state_dict()`` / ``load_state_dict()`` checkpoint it.
    """

    slow: float = 2.0
    fast: float = 1.0
    threshold: float = 0.995
    fast_decay: float = 0.999
    slow_decay: float = 0.99
    switched: bool = field(default=False, init=False)
    rho: float = field(default=math.nan, init=False)

    def __post_init__(self) -> None:
        for name in ("slow", "fast"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold: expected a number in (0, 1], got {self.threshold!r}")
        for name in ("fast_decay", "slow_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")

    def update(self, loss: float) -> bool:
        """Feed one step's loss (a float, or a one-element tensor); returns ``switched``.

        A non-finite loss is taken as it is: the averages become NaN and the rule can no longer
        fire, exactly as in the official code.
        """
        if self.switched:
            return True
        self.rho = math.exp(-max(self.slow - self.fast, 0.0))
        self.fast = self.fast_decay * self.fast + (1.0 - self.fast_decay) * float(loss)
        self.slow = self.slow_decay * self.slow + (1.0 - self.slow_decay) * self.fast
        if self.rho >= self.threshold:
            self.switched = True
        return self.switched

    def state_dict(self) -> dict[str, float | bool]:
        """What a checkpoint needs: the averages, ``rho`` and ``switched``."""
        return {"switched": self.switched, "rho": self.rho, "slow": self.slow, "fast": self.fast}

    def load_state_dict(self, state: dict) -> None:
        self.switched = bool(state["switched"])
        self.rho = float(state["rho"])
        self.slow = float(state["slow"])
        self.fast = float(state["fast"])
