"""kNN every N optimizer steps (``--eval-steps N``), optionally only in a window around the
ReLA -> BYOL switch (``--eval-steps-window BEFORE:AFTER``).

Without a window the live backbone is evaluated after every step whose number is a multiple of N.
With one, the switch's step is not known in advance (the adaptive rule decides it), so during the
ReLA phase the backbone's state is *snapshotted* (on the CPU) every N steps and only the snapshots
of the last BEFORE steps are kept; when the switch happens they are evaluated, then the live
backbone at the switch (offset 0) and every N steps after it up to offset AFTER. Evaluations run
between steps, outside the training clock, and touch no random generator or training state, so a
run with them trains exactly as one without.

The pending snapshots and the evaluations so far are part of the checkpoint
(:meth:`StepEvaluations.state_dict`), so a stopped run resumes them too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["StepEvaluations"]


class StepEvaluations:
    """Which steps to evaluate, the snapshots kept for them, and the results (``records``)."""

    def __init__(self, every: int, window: tuple[int, int] | None) -> None:
        if every < 1:
            raise ValueError(f"--eval-steps: must be >= 1, got {every}")
        self.every = every
        self.window = window
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.records: list[dict[str, Any]] = []

    def after_step(self, step: int, switch_step: int | None, backbone: nn.Module) -> list[int]:
        """Called after optimizer step ``step`` (and once when an epoch-start switch happens,
        with ``step == switch_step``); returns the steps of the pending snapshots to evaluate
        now (their states: :meth:`take`), and whether the live backbone is due is
        :meth:`live_due`. Keeps a snapshot of ``backbone`` when one is due."""
        if self.window is None:
            return []
        before = self.window[0]
        if switch_step is not None:
            self.snapshots = [(s, st) for s, st in self.snapshots if switch_step - s <= before]
            return [s for s, _ in self.snapshots]
        if step % self.every == 0 and before > 0:
            state = {k: v.detach().to("cpu", copy=True) for k, v in backbone.state_dict().items()}
            self.snapshots.append((step, state))
        # The switch can come at the next step: keep what lies within BEFORE steps of now.
        self.snapshots = [(s, state) for s, state in self.snapshots if step - s <= before]
        return []

    def take(self) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """The pending snapshots, removed from the pending list."""
        taken, self.snapshots = self.snapshots, []
        return taken

    def live_due(self, step: int, switch_step: int | None) -> bool:
        """Whether the live backbone is evaluated after step ``step``."""
        if self.window is None:
            return step % self.every == 0
        if switch_step is None:
            return False
        since = step - switch_step
        return 0 <= since <= self.window[1] and since % self.every == 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "snapshots": [{"step": s, "state": state} for s, state in self.snapshots],
            "records": list(self.records),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshots = [(int(item["step"]), dict(item["state"])) for item in state["snapshots"]]
        self.records = list(state["records"])
