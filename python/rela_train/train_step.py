"""One micro-batch of a training step: its views, the in-batch selection (``--policy inbatch``),
the forward and backward pass of the current phase's loss, and the step's statistics.

The optimizer step around it (learning rate, EMA, the switch rule, the record) is the
trainer's (:meth:`rela_train.engine.Trainer.step`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import KW_ONLY, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import rela_kernels as rk
from rela_train.build import RunParts
from rela_train.config import TrainConfig
from rela_train.data.sources import Batch
from rela_train.learner import frozen_statistics
from rela_train.transition import Transition

__all__ = ["MicroResult", "MicroStep", "PendingScores"]


class MicroResult(NamedTuple):
    # float64 [loss sum, rows, probe loss sum, probe hits, switch loss sum, switch rows] on the
    # device (the last two differ from the first two with inbatch and --inbatch-switch-loss
    # scored only): summed over the step's micro-batches, synced to the host once per step.
    totals: torch.Tensor
    indices: torch.Tensor  # the samples scored, and their scores for the score table
    scores: torch.Tensor
    scored: int  # rows scored by the in-batch selection (0 without it)


@dataclass(eq=False)
class MicroStep:
    """``micro_step(batch, g, scale, phase, since, sampler)``: forward and backward one
    micro-batch (gradients scaled by ``scale``); ``g`` draws its augmentation, ``since`` is the
    number of steps since the switch (the transition's argument)."""

    config: TrainConfig
    parts: RunParts
    device: torch.device
    transition: Transition
    _: KW_ONLY
    autocast: bool

    def autocast_context(self) -> AbstractContextManager:
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def inbatch_select(
        self, views: list[torch.Tensor], indices: torch.Tensor, prior: torch.Tensor | None,
        phase: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Score the large batch without gradients (view 1 of the current phase's loss);
        return ``(rows to back-propagate, every row's score)``."""
        learner, targets = self.parts.learner, self.parts.prior
        byol = learner.byol
        keep = min(self.config.batch_size, indices.shape[0])
        # Scoring normalises with batch statistics, as in training, and leaves BatchNorm's
        # running statistics and counters as they were.
        with frozen_statistics(learner):
            with self.autocast_context():
                features = byol.backbone(views[0])
                if phase == "rela":
                    assert targets is not None and learner.rela_head is not None
                    z = learner.rela_head(features)
                    chosen, scores = rk.score_and_select(z, prior, targets.transport, keep)
                else:
                    q = byol.predict(features)
                    target = byol.target(views[1])
                    scores = rk.cosine_loss(q, target, check_finite=False)  # one pair, in [0, 2]
                    chosen = rk.select_in_batch(scores, keep)
        return chosen, scores.float()

    def views(self, batch: Batch, g: torch.Generator, phase: str) -> list[torch.Tensor]:
        """The normalised views of a batch on the device: the photometric half only when the
        loader already cropped them, the whole augmentation otherwise."""
        augment = self.parts.augment[self.transition.view_phase(phase)]
        if batch.views is not None:
            crops = batch.views.to(self.device, non_blocking=True)
            views = augment.photometric(crops, g)
        else:
            images = batch.images.to(self.device, non_blocking=True)
            views = augment(images, g)
        if self.parts.channels_last:
            return [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def __call__(
        self, batch: Batch, g: torch.Generator, scale: float, phase: str, since: int | None,
        sampler: rk.SubsetSampler,
    ) -> MicroResult:  # fmt: skip
        parts, device = self.parts, self.device
        indices = batch.indices
        views = self.views(batch, g, phase)
        prior = scored_indices = scores = None
        rela_weight = self.transition.rela_weight(since)  # a blend computes both losses
        if phase == "rela" or rela_weight > 0:
            assert parts.prior is not None
            prior = parts.prior.rows(indices, device)
        if parts.inbatch:
            chosen, scores = self.inbatch_select(views, indices, prior, phase)
            scored_indices = indices
            chosen_cpu = chosen.cpu()
            views = [v[chosen] for v in views]
            indices = indices[chosen_cpu]
            prior = prior[chosen] if prior is not None else None
        labels = parts.train_source.labels[indices].to(device, non_blocking=True)
        weights = sampler.weight_of(indices).to(device, non_blocking=True)
        if prior is not None and (valid := parts.prior.valid(indices, device)) is not None:
            weights = weights * valid  # rows of images the prior could not read: no target
        check = device.type != "cuda"  # finiteness checks cost a host sync on CUDA
        with self.autocast_context():
            per_sample, score, logits = parts.objective(
                views, phase, prior, check,
                rela_weight=rela_weight, freeze_backbone=self.transition.freeze_backbone(since),
            )  # fmt: skip
            probe_loss = F.cross_entropy(logits, labels)
        loss = (per_sample * weights).mean() + probe_loss
        (loss * scale).backward()
        if scored_indices is None:
            scored_indices, scores = indices, score.detach().float()
            scored = 0
        else:
            scored = int(scored_indices.shape[0])
        totals = self._totals(batch, per_sample, probe_loss, logits, labels, scores)
        return MicroResult(totals, scored_indices, scores, scored)

    def _totals(
        self, batch: Batch, per_sample: torch.Tensor, probe_loss: torch.Tensor,
        logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        rows = labels.shape[0]
        correct = (logits.argmax(dim=1) == labels).sum()
        # The loss sum and size the switch rule is fed: inbatch with --inbatch-switch-loss
        # scored, the whole scored batch's; otherwise the back-propagated rows'.
        whole = self.parts.inbatch and self.config.inbatch_switch_loss == "scored"
        scored = scores.double().sum() if whole else per_sample.detach().double().sum()
        scored_rows = batch.indices.shape[0] if whole else rows
        return torch.stack(
            [
                per_sample.detach().double().sum(),
                torch.tensor(float(rows), dtype=torch.float64, device=correct.device),
                probe_loss.detach().double() * rows,
                correct.double(),
                scored.to(correct.device),
                torch.tensor(float(scored_rows), dtype=torch.float64, device=correct.device),
            ]
        )


class PendingScores:
    """The scores of this epoch's steps, kept on the device and written to the score table at
    the next :meth:`flush` (the end of an epoch or a checkpoint): no per-step host sync or
    collective."""

    def __init__(self, table: rk.ScoreTable, world: int, device: torch.device) -> None:
        self.table = table
        self.world = world
        self.device = device
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        self.items.append((indices, scores))

    def clear(self) -> None:
        self.items = []

    def flush(self) -> None:
        """Write the scores kept since the last flush (a collective: every rank calls it at the
        same point; the last write of a sample wins, in rank order)."""
        pending, self.items = self.items, []
        if not pending and self.world == 1:
            return
        if pending:
            indices = torch.cat([i for i, _ in pending])
            scores = torch.cat([v for _, v in pending])
        else:
            indices = torch.empty(0, dtype=torch.int64)
            scores = torch.empty(0, dtype=torch.float32, device=self.device)
        self.table.update(indices, scores)
