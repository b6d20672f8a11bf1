"""Data parallelism over exactly the parameters a step trains.

A run's steps do not all train the same parameters: the ReLA phase trains the backbone and the
ReLA head, the BYOL phase the backbone, projector and predictor; a ``blend`` transition adds the
ReLA head to BYOL's, ``warm-heads`` leaves the backbone out. One DistributedDataParallel over the
whole learner would have to search every step's autograd graph for the parameters left out
(``find_unused_parameters=True``: one more graph traversal per step, and a warning in every log).

:class:`PhaseParallel` instead wraps, for each combination a run meets, only the modules that
combination runs (:func:`rela_train.learner.step_modules`). Every wrapped parameter then receives
a gradient in every step of its wrapper, so no search is needed. The wrappers share the learner's
parameters; only the one whose forward ran all-reduces the gradients of that backward pass.
Each wrapper is made the first time its combination is met, at the same step on every rank (the
phase and the transition are agreed), so runs that never blend or freeze pay for no extra one.

The gradients are the ones a whole-learner wrapper gives: the same parameters receive the same
all-reduced sums, and the parameters a step leaves out keep no gradient (``None``) either way.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rela_train.learner import Objective, step_modules

__all__ = ["PhaseParallel"]

# Key of one wrapper: (phase, whether the ReLA loss is blended in, whether the backbone is frozen).
_Key = tuple[str, bool, bool]


class _StepPart(nn.Module):
    """The modules of one kind of step, registered (what DDP synchronises), whose forward is the
    objective's. The objective itself is held as a bound method, not as a child module, so the
    parameters of the modules the step leaves out stay outside the wrapper."""

    def __init__(self, objective: Objective, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.trained = nn.ModuleDict(modules)
        self.run = objective.forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(*args, **kwargs)


def _buffer_options(sync_buffers: bool) -> dict[str, bool]:
    """DDP's keyword for buffers broadcast from rank 0 at each forward: nothing for the default
    (on), ``forward_sync_buffers`` where this torch has it (the name ``broadcast_buffers`` is
    deprecated there), else ``broadcast_buffers``."""
    if sync_buffers:
        return {}
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
    return {key: False}


class PhaseParallel:
    """``objective`` data-parallel over the ranks of the default group, one DDP wrapper per kind
    of step (module doc). Called like :class:`~rela_train.learner.Objective`."""

    def __init__(
        self, objective: Objective, *, device: torch.device, sync_buffers: bool = True
    ) -> None:
        """``sync_buffers``: broadcast rank 0's buffers (BatchNorm statistics) at each forward,
        DDP's default; off with synchronised BatchNorm, which keeps them equal itself."""
        self.objective = objective
        self._device_ids = [device.index] if device.type == "cuda" else None
        self._buffers = _buffer_options(sync_buffers)
        self._wrappers: dict[_Key, DistributedDataParallel] = {}
        self._sync = True

    def wrapper(self, phase: str, *, blend: bool, freeze_backbone: bool) -> DistributedDataParallel:
        """The DDP wrapper of one kind of step, made on first use."""
        key = (phase, blend, freeze_backbone)
        if key not in self._wrappers:
            modules = step_modules(
                self.objective.learner, phase, blend=blend, freeze_backbone=freeze_backbone
            )
            self._wrappers[key] = DistributedDataParallel(
                _StepPart(self.objective, modules), device_ids=self._device_ids, **self._buffers
            )
        return self._wrappers[key]

    def __call__(
        self,
        views: list[torch.Tensor],
        phase: str,
        *inputs: Any,
        rela_weight: float = 0.0,
        freeze_backbone: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Objective.forward(views, phase, *inputs, ...)`` through the wrapper of this kind of
        step, which the phase and the two keywords select."""
        ddp = self.wrapper(phase, blend=rela_weight > 0, freeze_backbone=freeze_backbone)
        # DDP decides in the forward pass whether the backward all-reduces (DDP.no_sync).
        with nullcontext() if self._sync else ddp.no_sync():
            return ddp(
                views, phase, *inputs, rela_weight=rela_weight, freeze_backbone=freeze_backbone
            )

    def close(self) -> None:
        """Release the wrappers; call it before the process group is destroyed.

        Each wrapper's reducer holds a reference to the process group. Released after the
        group's last Python reference, it would be the one to destroy the group, and it does so
        holding the interpreter lock while joining the group's worker threads; a worker still
        freeing the tensors of a finished collective needs that lock, so the rank hangs at exit
        (or aborts, when this happens during interpreter shutdown). Released first, the group is
        destroyed by its own Python object, which lets go of the lock while it joins."""
        self._wrappers.clear()
        gc.collect()  # a wrapper kept alive by a reference cycle goes now, not at exit

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forward and backward passes inside accumulate gradients locally (as DDP.no_sync)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous
