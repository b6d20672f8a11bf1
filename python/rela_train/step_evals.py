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

Each evaluation is a ``step_eval`` record whose ``since_switch`` follows the step records'
convention: the record of step ``S`` has ``S - switch_step - 1``, so 0 is the state after the
first BYOL step and -1 the state the ReLA phase ended with (:func:`since_switch`).
:class:`StepEvalRunner` runs them: it owns the scratch backbone that snapshots are loaded into.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from rela_train.metrics_log import MetricsLog

__all__ = ["SINCE_SWITCH", "StepEvalRunner", "StepEvaluations", "since_switch"]

# How the records count `since_switch` (saved with them, so records of older checkpoints, which
# counted from the state at the switch, are converted on resume).
SINCE_SWITCH = "first-byol-step-is-0"


def since_switch(step: int, switch_step: int | None) -> int | None:
    """The ``since_switch`` of the record of optimizer step ``step`` (numbered from 1): the
    step's index counted from the first BYOL step (0), negative before it; None before the
    switch is known or without one. ``switch_step`` is the last ReLA-phase step."""
    return None if switch_step is None else step - switch_step - 1


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
            "since_switch": SINCE_SWITCH,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshots = [(int(item["step"]), dict(item["state"])) for item in state["snapshots"]]
        records = [dict(record) for record in state["records"]]
        if state.get("since_switch") != SINCE_SWITCH:
            # Checkpoints without the key counted from the state at the switch (0 there).
            for record in records:
                if record.get("since_switch") is not None:
                    record["since_switch"] -= 1
        self.records = records


class StepEvalRunner:
    """Runs the evaluations :class:`StepEvaluations` asks for after each step and writes their
    ``step_eval`` records. ``evaluate(backbone)`` returns ``{"knn_acc", "eval_time"}`` (called on
    rank 0 only; the other ranks wait at a barrier)."""

    def __init__(
        self,
        schedule: StepEvaluations,
        evaluate: Callable[[nn.Module], dict[str, Any]],
        metrics: MetricsLog,
        *,
        world: int,
        rela: bool,
    ) -> None:
        self.schedule = schedule
        self.evaluate = evaluate
        self.metrics = metrics
        self.world = world
        self.rela = rela
        self._scratch: nn.Module | None = None  # evaluates snapshots

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.schedule.records

    def after_step(self, step: int, switch_step: int | None, backbone: nn.Module) -> None:
        """The evaluations due after optimizer step ``step``: pending snapshots at the switch,
        then the live ``backbone`` when due."""
        due = self.schedule.after_step(step, switch_step, backbone)
        if due:
            for snapshot_step, state in self.schedule.take():
                if switch_step is not None and snapshot_step >= switch_step:
                    continue  # the live evaluation at the switch stands for it
                if self._scratch is None:
                    self._scratch = copy.deepcopy(backbone)
                self._scratch.load_state_dict(state)
                self._record(snapshot_step, switch_step, self._scratch)
        if self.schedule.live_due(step, switch_step):
            self._record(step, switch_step, backbone)

    def _record(self, step: int, switch_step: int | None, backbone: nn.Module) -> None:
        record: dict[str, Any] = {"event": "step_eval", "step": step}
        if self.metrics.main:
            result = self.evaluate(backbone)
            record["knn_acc"] = result["knn_acc"]
            record["eval_time"] = result["eval_time"]
        record["since_switch"] = since_switch(step, switch_step)
        rela = switch_step is None or step <= switch_step
        record["phase"] = "rela" if rela and self.rela else "byol"
        self.schedule.records.append(
            {k: record.get(k) for k in ("step", "since_switch", "phase", "knn_acc")}
        )
        self.metrics.write(record)
        if self.world > 1:
            dist.barrier()

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)
