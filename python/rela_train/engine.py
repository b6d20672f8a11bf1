"""The training loop: BYOL + ReLA-F with per-epoch subsets, checkpoints and exact resume.

The run's parts are set up by :mod:`rela_train.build`, its checkpoints written and restored by
:mod:`rela_train.checkpoint`; this module drives them.

Per optimizer step (``accum_steps`` micro-batches): augment two views on the device; in the
ReLA phase regress ``W h(x_v)`` onto the transported prior embeddings (fused kernel), in the BYOL
phase use the symmetric BYOL loss; multiply per-sample losses by the sampler's infobatch weights;
record them in the score table; step the optimizer with the scheduled learning rate; move the
target network by the scheduled EMA; feed the step's loss to the switch rule.

Exact resume: every random draw is a pure function of (seed, epoch, step, micro-batch, rank) --
subsets come from the sampler (seeded per epoch), augmentation from a generator seeded per
micro-batch -- and a checkpoint holds everything else that evolves (weights, optimizer, score
table, the current epoch's subset, the switch state, counters, and the number of metric lines
written). A resumed run therefore replays the remaining steps bit for bit (on the same device and
thread count) and rewrites ``metrics.jsonl`` from the checkpoint on.

Distributed (``torchrun``, one process per GPU, or per CPU "rank" with gloo): the trained modules
are wrapped in ``DistributedDataParallel``, one wrapper per kind of step over the parameters it
trains (:mod:`rela_train.parallel`; gradients averaged in buckets that overlap the backward pass;
no all-reduce on accumulation micro-batches), BatchNorm is synced on multi-GPU CUDA runs, step
losses are averaged for the switch, the score table all-gathers, and only rank 0 writes files and
evaluates. Each step starts with one tiny all-reduce in which the ranks agree on stopping (a signal
seen by any rank stops all after the same step) and on skipping a step whose images were all
unreadable on some rank. Data are consumed per step as one global chunk of the epoch's order
(``global batch = micro-batch x accumulation x world``), sharded by ``rk.SubsetSampler``: a
checkpoint therefore resumes on another world size (same global batch, the accumulation or the
per-rank batch adapted) at the same position of the same epoch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import rela_kernels as rk
from rela_kernels.atomic_io import atomic_write_text
from rela_train.build import accumulation_steps, build_run, epoch_steps
from rela_train.checkpoint import (
    CHECKPOINT,
    Counters,
    adapt_to_world,
    check_checkpoint_config,
    checkpoint_state,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from rela_train.config import RESUME_SETTINGS, TrainConfig, parse_step_window
from rela_train.data.sources import Batch, FolderSource, Source
from rela_train.data.views import CropPlan, stable_seed
from rela_train.evaluate import evaluate_backbone
from rela_train.optim import ema_tau, scheduled_lr_factor, set_learning_rates
from rela_train.parallel import PhaseParallel
from rela_train.provenance import run_provenance
from rela_train.run_directory import RunDirectory
from rela_train.runtime import (
    DistributedError,
    agree_min,
    describe_failure,
    is_collective_failure,
    resolve_device,
)
from rela_train.runtime import setup as setup_distributed
from rela_train.step_evals import StepEvaluations
from rela_train.tensorboard_log import TensorBoardLog, check_tensorboard, tensorboard_dir
from rela_train.transition import parse_transition

__all__ = ["TIME_FIELDS", "Hooks", "RunResult", "StepAgreement", "StopSignal", "Trainer"]

# Fields of metrics.jsonl that depend on the clock (everything else replays exactly on resume).
TIME_FIELDS = ("train_time", "wall_time", "img_per_s", "eval_time")


@dataclass
class Hooks:
    """Callbacks for tests and tools; each receives the trainer."""

    on_step_end: Callable[[Trainer], None] | None = None
    on_epoch_end: Callable[[Trainer], None] | None = None


@dataclass
class RunResult:
    status: str  # "finished" or "interrupted"
    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    signal: int | None = None  # SIGTERM/SIGINT when a signal interrupted the run


class StepAgreement(NamedTuple):
    """What every rank agreed on before a step."""

    skip: bool  # some rank has no readable micro-batch: no rank trains this step
    stop: bool  # some rank was asked to stop: all stop after this step


class StopSignal:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, exit; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the signal that asked, if one did
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        print(
            f"rela-train: got {signal.Signals(signum).name}; checkpointing after this step "
            "(Ctrl-C again to abort without a checkpoint)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignal:
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One run: ``Trainer(config, run_dir).run()`` (or ``resume=True`` to continue it).

    The parts come from :func:`rela_train.build.build_run`, the checkpoint from
    :mod:`rela_train.checkpoint`; this class is the loop. Where the run stands is
    ``self.counters`` (:class:`~rela_train.checkpoint.Counters`)."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        hooks: Hooks | None = None,
        log: Callable[[str], None] | None = None,
        preset: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.hooks = hooks or Hooks()
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.stop = StopSignal()
        self._agreed_stop = False  # the stop decision all ranks reached at the last step
        self._resume_state = None
        if resume:
            saved = TrainConfig.load(self.run_dir / "config.json")
            # Only settings that cannot change the results may differ on resume.
            config = saved.replace(**{name: getattr(config, name) for name in RESUME_SETTINGS})
            self._resume_state = load_checkpoint(self.run_dir)
            check_checkpoint_config(self._resume_state, config, self.run_dir)
        else:
            RunDirectory.check_new(self.run_dir)  # before anything is created
        # config.json records the transition itself, so a later change of what `auto` means
        # cannot change how a run resumes.
        config = config.replace(switch_transition=config.concrete_transition)
        self._tensorboard: TensorBoardLog | None = None
        if config.tensorboard is not None:
            check_tensorboard(tensorboard_dir(config.tensorboard, self.run_dir), new=not resume)
        self._run_directory: RunDirectory | None = None
        self.train_source: Source | None = None
        self.val_source: Source | None = None
        self._eval_bank: Source | None = None
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        try:
            device = resolve_device(config.device)
        except ValueError as error:
            raise ValueError(f"--device: {error}") from error
        self.dist = setup_distributed(device, config.dist_timeout)
        try:
            self.world, self.rank, self.main = self.dist.world, self.dist.rank, self.dist.main
            if device.type == "cuda" and self.world > 1:
                device = torch.device("cuda", self.dist.local_rank)
            self.device = device
            if self._resume_state is not None:
                config = adapt_to_world(
                    config, self._resume_state, self.world, self.run_dir, self.log
                )
            self.config = config
            self.accum_steps = accumulation_steps(config, self.world)
            cuda = self.device.type == "cuda"
            self.autocast = config.amp == "bf16" or (config.amp == "auto" and cuda)
            self.channels_last = cuda if config.channels_last is None else config.channels_last
            self.sync_bn = (cuda and self.world > 1) if config.sync_bn is None else config.sync_bn
            if self.sync_bn and not cuda:
                raise ValueError("--sync-bn: synchronised BatchNorm needs CUDA training")
            parts = build_run(
                config,
                self.run_dir,
                self.device,
                self.dist,
                accum_steps=self.accum_steps,
                sync_bn=self.sync_bn,
                channels_last=self.channels_last,
                new=self._resume_state is None,
                log=self.log,
            )
        except BaseException:
            self.dist.close()
            raise
        self.train_source = parts.train_source
        self.val_source = parts.val_source
        self._run_directory = parts.run_directory
        self.prior = parts.prior
        self.learner = parts.learner
        self.objective = parts.objective
        self.inbatch = parts.inbatch
        self.micro_batch = parts.micro_batch
        self.score_table = parts.score_table
        self.samplers = parts.samplers
        self._policy = parts.policy
        self.sampler = parts.samplers[parts.policy]
        self.step_images = parts.step_images
        self.steps_per_epoch = parts.steps_per_epoch
        self.total_steps = parts.total_steps
        self.warmup_steps = parts.warmup_steps
        self.optimizer = parts.optimizer
        self.switch = parts.switch
        self.augment = parts.augment
        self.channels_last = parts.channels_last
        self.transition = parse_transition(config.switch_transition)
        self.step_evals = (
            StepEvaluations(
                config.eval_steps,
                None
                if config.eval_steps_window is None
                else parse_step_window(config.eval_steps_window),
            )
            if config.eval_steps
            else None
        )
        self._scratch_backbone: nn.Module | None = None  # evaluates step-eval snapshots
        # Scores of this epoch's steps, written to the score table at the next flush_scores.
        self._pending_scores: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.counters = Counters()  # restored on resume
        self.evaluations: list[dict[str, Any]] = []
        # Preset, data fingerprint and code version (a resumed run's comes from its checkpoint).
        self.provenance = run_provenance(preset, self.train_source.fingerprint)
        self._wall_start = time.perf_counter()

    def log(self, message: str) -> None:
        if getattr(self, "main", True):
            self._log(message)

    def _close_sources(self) -> None:
        for source in (self.train_source, self.val_source, self._eval_bank):
            if source is not None:
                source.close()

    # ------------------------------------------------------------------------------------------
    # Checkpoints and metrics
    # ------------------------------------------------------------------------------------------

    def flush_scores(self) -> None:
        """Write the scores kept since the last flush to the score table (a collective: every
        rank calls it at the same point; the last write of a sample wins, in rank order)."""
        pending, self._pending_scores = self._pending_scores, []
        if not pending and self.world == 1:
            return
        if pending:
            indices = torch.cat([i for i, _ in pending])
            scores = torch.cat([v for _, v in pending])
        else:
            indices = torch.empty(0, dtype=torch.int64)
            scores = torch.empty(0, dtype=torch.float32, device=self.device)
        self.score_table.update(indices, scores)

    def save_checkpoint(self) -> Path:
        path = self.run_dir / "checkpoints" / CHECKPOINT
        if self.main:
            save_checkpoint(path, checkpoint_state(self))
        return path

    def _write_metrics(self, record: dict[str, Any]) -> None:
        self.counters.metrics_lines += 1
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tensorboard is not None:
            self._tensorboard.write(record)

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        return "byol" if self.switch.switched else "rela"

    def steps_since_switch(self) -> int | None:
        """Optimizer steps taken since the switch (0 in the first BYOL-phase step); None before
        it and in BYOL-only runs. What every ``--switch-transition`` is a function of."""
        if self.counters.switch_step is None or not self.switch.switched:
            return None
        return self.counters.global_step - self.counters.switch_step

    def _autocast(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _memory_format(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.channels_last:
            return [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    @torch.no_grad()
    def _inbatch_select(
        self, views: list[torch.Tensor], indices: torch.Tensor, prior: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score the large batch without gradients (view 1 of the current phase's loss);
        return ``(rows to back-propagate, every row's score)``."""
        byol = self.learner.byol
        keep = min(self.config.batch_size, indices.shape[0])
        # BatchNorm momentum 0 while scoring: batch statistics as in training, running
        # statistics untouched.
        norms = [
            m for m in self.learner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            with self._autocast():
                features = byol.backbone(views[0])
                if self.phase == "rela":
                    assert self.prior is not None and self.learner.rela_head is not None
                    z = self.learner.rela_head(features)
                    chosen, scores = rk.score_and_select(z, prior, self.prior.transport, keep)
                else:
                    q = byol.predict(features)
                    target = byol.target(views[1])
                    scores = rk.cosine_loss(q, target, check_finite=False)  # one pair, in [0, 2]
                    chosen = rk.select_in_batch(scores, keep)
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
        return chosen, scores.float()

    def _views(self, batch: Batch, g: torch.Generator) -> list[torch.Tensor]:
        """The normalised views of a batch on the device: the photometric half only when the
        loader already cropped them, the whole augmentation otherwise."""
        phase = self.transition.view_phase(self.phase)
        if batch.views is not None:
            crops = batch.views.to(self.device, non_blocking=True)
            views = self.augment[phase].photometric(crops, g)
        else:
            images = batch.images.to(self.device, non_blocking=True)
            views = self.augment[phase](images, g)
        return self._memory_format(views)

    def _micro_step(
        self, batch: Batch, g: torch.Generator, scale: float, since: int | None
    ) -> torch.Tensor:
        """Forward and backward one micro-batch; returns float64 ``[loss sum, rows, probe loss
        sum, probe hits, switch loss sum, switch rows]`` (the last two differ from the first two
        with ``inbatch`` and ``--inbatch-switch-loss scored`` only)."""
        phase = self.phase
        indices = batch.indices
        views = self._views(batch, g)
        prior = None
        rela_weight = self.transition.rela_weight(since)  # a blend computes both losses
        if phase == "rela" or rela_weight > 0:
            assert self.prior is not None
            prior = self.prior.rows(indices, self.device)
        if self.inbatch:
            chosen, scores = self._inbatch_select(views, indices, prior)
            self._pending_scores.append((indices, scores))
            self.counters.samples_scored += indices.shape[0]
            chosen_cpu = chosen.cpu()
            views = [v[chosen] for v in views]
            indices = indices[chosen_cpu]
            prior = prior[chosen] if prior is not None else None
        labels = self.train_source.labels[indices].to(self.device, non_blocking=True)
        weights = self.sampler.weight_of(indices).to(self.device, non_blocking=True)
        if prior is not None and (valid := self.prior.valid(indices, self.device)) is not None:
            weights = weights * valid  # rows of images the prior could not read: no target
        check = self.device.type != "cuda"  # finiteness checks cost a host sync on CUDA
        with self._autocast():
            per_sample, score, logits = self.objective(
                views, phase, prior, check,
                rela_weight=rela_weight, freeze_backbone=self.transition.freeze_backbone(since),
            )  # fmt: skip
            probe_loss = F.cross_entropy(logits, labels)
        loss = (per_sample * weights).mean() + probe_loss
        (loss * scale).backward()
        if not self.inbatch:
            self._pending_scores.append((indices, score.detach().float()))
        rows = indices.shape[0]
        correct = (logits.argmax(dim=1) == labels).sum()
        # Sums of the step's statistics, kept on the device (one host sync per step, later).
        # The loss sum and size the switch rule is fed: inbatch with --inbatch-switch-loss
        # scored, the whole scored batch's; otherwise the back-propagated rows'.
        whole = self.inbatch and self.config.inbatch_switch_loss == "scored"
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

    def _switched(self) -> None:
        """Record the switch to BYOL (it takes effect from the next step)."""
        if not self.config.rela:
            return
        if self.config.switch_scores == "reset":
            self._reset_scores()
        if self.transition.reset_target:
            self.learner.byol.reset_target()
        self.counters.switch_step = self.counters.global_step
        self.counters.switch_epoch = self.counters.epoch
        rho = "" if math.isnan(self.switch.rho) else f" (rho={self.switch.rho:.5f})"
        step, epoch = self.counters.global_step, self.counters.epoch
        self.log(f"switch to BYOL after step {step}, epoch {epoch + 1}{rho}")

    def _step_evaluations(self) -> None:
        """``--eval-steps``: the kNN evaluations due after this step (see
        :mod:`rela_train.step_evals`), each a ``step_eval`` line of metrics.jsonl."""
        evals = self.step_evals
        if evals is None:
            return
        step, switch_step = self.counters.global_step, self.counters.switch_step
        backbone = self.learner.byol.backbone
        due = evals.after_step(step, switch_step, backbone)
        if due:
            for snapshot_step, state in evals.take():
                if switch_step is not None and snapshot_step >= switch_step:
                    continue  # the live evaluation at offset 0 stands for it
                if self._scratch_backbone is None:
                    self._scratch_backbone = copy.deepcopy(backbone)
                self._scratch_backbone.load_state_dict(state)
                self._step_eval_record(snapshot_step, switch_step, self._scratch_backbone)
        if evals.live_due(step, switch_step):
            self._step_eval_record(step, switch_step, None)

    def _step_eval_record(
        self, step: int, switch_step: int | None, backbone: nn.Module | None
    ) -> None:
        record: dict[str, Any] = {"event": "step_eval", "step": step}
        if self.main:
            result = self.evaluate(final=False, backbone=backbone)
            record["knn_acc"] = result["knn_acc"]
            record["eval_time"] = result["eval_time"]
        record["since_switch"] = None if switch_step is None else step - switch_step
        rela = switch_step is None or step <= switch_step
        record["phase"] = "rela" if rela and self.config.rela else "byol"
        self.step_evals.records.append(
            {k: record.get(k) for k in ("step", "since_switch", "phase", "knn_acc")}
        )
        self._write_metrics(record)
        if self.world > 1:
            dist.barrier()

    def _reset_scores(self) -> None:
        """At the switch, loss-based policies start over with BYOL losses: the ReLA-phase scores
        (written and pending) are dropped and the table is back to its initial 2.0, so samples
        are never ranked by losses of two objectives. The same point on every rank."""
        self._pending_scores = []
        self.score_table.reset()

    def _agree_on_skip_and_stop(self, loaded: int) -> StepAgreement:
        """The same on every rank: a step is skipped when some rank has no readable
        micro-batch (``loaded`` is this rank's count); a stop asked of any rank stops all."""
        least, stop = agree_min(self.dist, [loaded, -int(self.stop.requested)])
        return StepAgreement(skip=least == 0, stop=stop < 0)

    def step(self, batches: list[Batch]) -> dict[str, Any]:
        """One optimizer step on this rank's micro-batches ``batches`` (a collective when
        distributed); returns the step's metrics record."""
        config = self.config
        phase = self.phase
        since = self.steps_since_switch()
        factor = scheduled_lr_factor(
            config.lr_schedule, self.counters.global_step, self.total_steps, self.warmup_steps
        ) * self.transition.lr_multiplier(since)
        set_learning_rates(self.optimizer, factor, fixed=("probe",))
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        scale = 1.0 / len(batches)
        ddp = isinstance(self.objective, PhaseParallel)
        for micro, batch in enumerate(batches):
            seed = stable_seed(
                config.seed, self.counters.epoch, self.counters.step_in_epoch, micro, self.rank
            )
            g = torch.Generator().manual_seed(seed)
            # Gradients are all-reduced (by DDP) only in the step's last backward pass.
            last = micro == len(batches) - 1
            with self.objective.no_sync() if ddp and not last else nullcontext():
                totals += self._micro_step(batch, g, scale, since)
        if self.world > 1:
            dist.all_reduce(totals)
        self.optimizer.step()
        tau = ema_tau(
            config.tau_schedule, self.counters.global_step, self.total_steps, config.ema_base
        )
        self.learner.byol.update_target(tau)
        totals = totals.cpu()  # the step's one host sync: the switch needs the loss now
        self.counters.global_step += 1
        rows = max(1.0, float(totals[1]))
        loss = float(totals[0]) / rows
        self.counters.samples_seen += int(totals[1])
        # inbatch back-propagates the hardest rows; the switch rule may see the scored batch.
        switch_loss = float(totals[4]) / max(1.0, float(totals[5]))
        switched = phase == "rela" and self.switch.after_step(
            switch_loss, self.counters.global_step
        )
        if switched and self.counters.switch_step is None:
            self._switched()
        lr = next(g["lr"] for g in self.optimizer.param_groups if g["name"] == "byol")
        rho = self.switch.rho
        transition = {}
        if since is not None and not self.transition.hard:
            transition = {
                "since_switch": since,
                "rela_weight": self.transition.rela_weight(since),
                "backbone_frozen": self.transition.freeze_backbone(since),
            }
        return {
            **transition,
            "step": self.counters.global_step,
            "epoch": self.counters.epoch,
            "phase": phase,
            "loss": loss,
            "rho": None if math.isnan(rho) else rho,
            "lr": lr,
            "tau": tau,
            "samples_seen": self.counters.samples_seen,
            "probe_loss": float(totals[2]) / rows,
            "probe_acc": float(totals[3]) / rows,
        }

    # ------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------

    def evaluate(self, *, final: bool, backbone: nn.Module | None = None) -> dict[str, Any]:
        """kNN accuracy (per epoch: on the eval bank); at the end also the linear probe.
        ``backbone``: another network than the run's (a step-eval snapshot)."""
        try:
            return self._evaluate(final, backbone or self.learner.byol.backbone)
        finally:
            # Evaluation's decoding processes are not kept between evaluations (the training
            # source's are: they serve every epoch).
            for source in (self.val_source, self._eval_bank):
                if source is not None and source is not self.train_source:
                    source.close()

    def _evaluate(self, final: bool, backbone: nn.Module) -> dict[str, Any]:
        config = self.config
        start = time.perf_counter()
        bank, extra_bank = self.train_source, None
        if not final and config.eval_bank is not None:
            bank = self._eval_bank_source()
        if final and config.eval_bank is not None and config.eval_bank < self.train_source.n:
            # The accuracy curve's last point uses the same bank as the per-epoch points.
            extra_bank = self._eval_bank_source()
        result = evaluate_backbone(
            backbone,
            bank,
            self.val_source,
            config=config,
            num_classes=len(self.train_source.classes),
            device=self.device,
            channels_last=self.channels_last,
            autocast=self.autocast,
            probe_iterations=config.probe_epochs if final else 0,
            probe=config.probe,
            extra_bank=extra_bank,
        )
        result["eval_time"] = time.perf_counter() - start
        return result

    def _eval_bank_source(self) -> Source:
        """The fixed subset of the training set that per-epoch kNN uses as its bank."""
        if self._eval_bank is None:
            self._eval_bank = self.train_source.subset(self.config.eval_bank, seed=1)
        return self._eval_bank

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------

    def pending_steps(self) -> list[list[torch.Tensor]]:
        """This rank's micro-batches (sample indices), grouped by step, for the rest of the
        epoch: step ``s`` takes the global positions ``[s, s + 1) x step_images`` of the epoch's
        order, sharded by the sampler."""
        accum = self.accum_steps
        remaining = self.steps_per_epoch - self.counters.step_in_epoch
        order = self.sampler.local_indices(start=self.counters.step_in_epoch * self.step_images)
        size = min(self.micro_batch, order.shape[0])
        count = max(1, min(remaining * accum, order.shape[0] // size))
        micro = [order[i * size : (i + 1) * size] for i in range(count)]
        return [group for r in range(remaining) if (group := micro[r * accum : (r + 1) * accum])]

    def crop_plan(self) -> CropPlan:
        """How the loader crops this epoch's views (sources that crop in the loader)."""
        specs = self.augment[self.transition.view_phase(self.phase)].views
        return CropPlan(specs, self.config.image_size, self.config.seed, self.counters.epoch)

    def request_stop(self) -> None:
        """Stop after the current step with a checkpoint (what SIGTERM/SIGINT do)."""
        self.stop.requested = True

    def run(self) -> RunResult:
        """Train to the end, or until a stop: then a checkpoint is written."""
        try:
            return self._train()
        except Exception as error:
            if self.world > 1 and is_collective_failure(error):
                checkpoint = self.run_dir / "checkpoints" / CHECKPOINT
                raise DistributedError(describe_failure(self.dist, error, checkpoint)) from error
            raise
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()
            self._close_sources()
            if self._run_directory is not None:
                self._run_directory.release()
            if isinstance(self.objective, PhaseParallel):
                self.objective.close()  # before the process group goes (PhaseParallel.close)
            self.dist.close()

    def _train(self) -> RunResult:
        config = self.config
        self._wall_start = time.perf_counter()
        resumed = self._resume_state is not None
        if resumed:
            restore(self, self._resume_state)
            self._resume_state = None
            self.log(
                f"resuming {self.run_dir} at epoch {self.counters.epoch + 1}/{config.epochs}, step "
                f"{self.counters.step_in_epoch}/{self.steps_per_epoch}"
            )
            mid_epoch = self.counters.step_in_epoch > 0
            if self.main:  # the per-rank batch or accumulation may have changed (world size)
                atomic_write_text(self.run_dir / "config.json", config.to_json())
        else:
            if self.main:
                atomic_write_text(self.run_dir / "config.json", config.to_json())
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            mid_epoch = False
        if self.main and config.tensorboard is not None:
            # After a resume the steps past the checkpoint are replayed: purged, not doubled.
            self._tensorboard = TensorBoardLog(
                tensorboard_dir(config.tensorboard, self.run_dir),
                resume_step=self.counters.global_step if resumed else None,
            )
        self._log_start()
        with self.stop:
            while self.counters.epoch < config.epochs:
                if not mid_epoch:
                    if (
                        self.switch.before_epoch(self.counters.epoch)
                        and self.counters.switch_step is None
                    ):
                        self._switched()
                        self._step_evaluations()  # the snapshots and offset 0
                    # A table without scores of the current objective (the first epoch, or
                    # right after the switch reset it) would rank by index: draw at random.
                    reset = (
                        config.switch_scores == "reset"
                        and self.counters.switch_step == self.counters.global_step
                    )
                    fresh = self.counters.epoch == 0 or reset
                    warmup = fresh and self._policy in ("hard", "easy")
                    self.sampler = self.samplers["random" if warmup else self._policy]
                    self.sampler.set_epoch(self.counters.epoch)
                    self.steps_per_epoch = epoch_steps(
                        self.sampler, self.counters.epoch, self.step_images
                    )
                    self.counters.step_in_epoch = 0
                mid_epoch = False
                if self._run_epoch() == "stopped":
                    self.flush_scores()
                    self.save_checkpoint()
                    self.log(
                        f"stopped at epoch {self.counters.epoch + 1}, step "
                        f"{self.counters.step_in_epoch}; a "
                        f"checkpoint is in {self.run_dir / 'checkpoints'}. Continue with: "
                        f"rela-train fit --resume {self.run_dir}"
                    )
                    return RunResult("interrupted", self.run_dir, signal=self.stop.signum)
        summary = self._finish()
        return RunResult("finished", self.run_dir, summary)

    def _log_start(self) -> None:
        config = self.config
        what = "BYOL + ReLA" if config.rela else "BYOL"
        self.log(
            f"{what}: {self.train_source.name} ({self.train_source.n} images), budget "
            f"{config.budget:g} ({config.policy}), {config.epochs} epochs x "
            f"{self.steps_per_epoch} steps, {config.arch} width {config.width}, device "
            f"{self.device}, {torch.get_num_threads()} threads"
        )

    def _run_epoch(self) -> str:
        config = self.config
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.counters.step_in_epoch,
            desc=f"epoch {self.counters.epoch + 1}/{config.epochs}",
            disable=not (config.progress and self.main),
            dynamic_ncols=True,
            leave=False,
        )
        with bar:
            while self.counters.step_in_epoch < self.steps_per_epoch:
                if self._run_steps(bar) == "stopped":
                    return "stopped"
        if self.counters.global_step == 0:  # the same on every rank: skips are agreed
            raise ValueError(
                f"{self.train_source.name}: no step of epoch {self.counters.epoch + 1} could be "
                "trained: "
                f"every batch had fewer than 2 readable images ({self.train_source.skipped} "
                "unreadable images skipped); check the training data"
            )
        self._end_epoch()
        stop = self._agreed_stop if self.world > 1 else self.stop.requested
        if stop and self.counters.epoch < config.epochs:
            return "stopped"
        return "done"

    def _run_steps(self, bar: tqdm) -> str:
        """Steps until the epoch ends, a stop, or a phase switch that changes the loader's
        crops ("restart": the stream is rebuilt for the new phase from the next step)."""
        pending = self.pending_steps()
        flat = [b for group in pending for b in group]
        phase = self.phase
        stream = self.train_source.batches(flat, self.crop_plan())
        crops_in_loader = isinstance(self.train_source, FolderSource)
        for group in pending:
            start = time.perf_counter()
            loaded = []
            for _ in group:
                batch = next(stream, None)
                # Unreadable images shrink a batch; BatchNorm needs at least two rows.
                if batch is not None and batch.indices.shape[0] >= 2:
                    loaded.append(batch)
            agreed = self._agree_on_skip_and_stop(len(loaded))
            self._agreed_stop = agreed.stop
            if agreed.skip:
                self.log(
                    f"step {self.counters.step_in_epoch}: no readable images on some rank; skipped"
                )
                self.counters.step_in_epoch += 1
                continue
            record = self.step(loaded)
            self.counters.step_in_epoch += 1
            elapsed = time.perf_counter() - start
            self.counters.train_time += elapsed
            rows = sum(int(batch.indices.shape[0]) for batch in loaded) * self.world
            record["img_per_s"] = rows / max(elapsed, 1e-9)
            record["train_time"] = self.counters.train_time
            self._write_metrics(record)
            self._step_evaluations()  # after the clock stopped: not training time
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", phase=record["phase"],
                img_s=f"{record['img_per_s']:.0f}",
            )  # fmt: skip
            bar.update(1)
            if self.hooks.on_step_end is not None:
                self.hooks.on_step_end(self)
            stop = self._agreed_stop if self.world > 1 else self.stop.requested
            if stop and self.counters.step_in_epoch < self.steps_per_epoch:
                return "stopped"
            more = self.counters.step_in_epoch < self.steps_per_epoch
            if crops_in_loader and self.phase != phase and more:
                return "restart"
        return "done"

    def _end_epoch(self) -> None:
        config = self.config
        epoch = self.counters.epoch
        record: dict[str, Any] = {
            "event": "epoch",
            "epoch": epoch,
            "step": self.counters.global_step,
            "phase": self.phase,
            "samples_seen": self.counters.samples_seen,
            "train_time": self.counters.train_time,
            "skipped_images": self.train_source.skipped,
        }
        last = epoch + 1 == config.epochs
        if config.eval_every and (epoch + 1) % config.eval_every == 0 and not last:
            if self.main:
                result = self.evaluate(final=False)
                record.update(result)
                self.evaluations.append(
                    {k: record[k] for k in ("epoch", "samples_seen", "train_time", "knn_acc")}
                )
                self.log(
                    f"epoch {epoch + 1}/{config.epochs}: kNN {result['knn_acc']:.4f} "
                    f"({self.phase}, {self.counters.samples_seen} samples, "
                    f"{self.counters.train_time:.0f} s)"
                )
            if self.world > 1:
                dist.barrier()
        self._write_metrics(record)
        self.counters.epoch += 1
        self.counters.step_in_epoch = 0
        self.flush_scores()
        self.save_checkpoint()
        if self.hooks.on_epoch_end is not None:
            self.hooks.on_epoch_end(self)

    @property
    def wall_time(self) -> float:
        """Seconds this run has existed in processes, over all its resumptions."""
        return self.counters.wall_time + time.perf_counter() - self._wall_start

    def _finish(self) -> dict[str, Any]:
        config = self.config
        summary: dict[str, Any] = {}
        if self.main:
            result = self.evaluate(final=True)
            wall_time = self.wall_time
            self.evaluations.append(
                {
                    "epoch": self.counters.epoch - 1,
                    "samples_seen": self.counters.samples_seen,
                    "train_time": self.counters.train_time,
                    "knn_acc": result.get("knn_acc_bank", result["knn_acc"]),
                }
            )
            summary = {
                "run_dir": str(self.run_dir),
                "method": "BYOL + ReLA" if config.rela else "BYOL",
                "dataset": self.train_source.name,
                "train_images": self.train_source.n,
                "val_images": self.val_source.n,
                "epochs": config.epochs,
                "steps": self.counters.global_step,
                "budget": config.budget,
                "policy": config.policy,
                "prior": config.prior or config.prior_store,
                "switch": config.switch if config.rela else None,
                "switch_step": self.counters.switch_step,
                "switch_epoch": self.counters.switch_epoch,
                "last_rho": None if math.isnan(self.switch.rho) else self.switch.rho,
                "samples_seen": self.counters.samples_seen,
                "samples_scored": self.counters.samples_scored,
                "train_time": self.counters.train_time,
                "wall_time": wall_time,
                "eval_time": result["eval_time"],
                "knn_acc": result["knn_acc"],
                "knn_acc_bank": result.get("knn_acc_bank"),
                "eval_bank": config.eval_bank,
                "linear_acc": result.get("linear_acc"),
                "probe": config.probe,
                "linear_acc_official": result.get("linear_acc_official"),
                "linear_acc_official_std": result.get("linear_acc_official_std"),
                "skipped_images": self.train_source.skipped,
                "skipped_files": sorted(
                    {*self.train_source.unreadable(), *self.val_source.unreadable()}
                ),
                "evaluations": self.evaluations,
                "switch_transition": config.switch_transition if config.rela else None,
                "step_evaluations": [] if self.step_evals is None else self.step_evals.records,
                "device": str(self.device),
                "threads": torch.get_num_threads(),
            }
            self._write_metrics(
                {"event": "final", **{k: v for k, v in summary.items() if k != "evaluations"}}
            )
            atomic_write_text(
                self.run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n"
            )
            self.save_checkpoint()
            self.log(
                f"done: kNN {summary['knn_acc']:.4f}, linear probe "
                f"{_fmt(result.get('linear_acc', result.get('linear_acc_official')))}, "
                f"{self.counters.samples_seen} samples in "
                f"{self.counters.train_time:.0f} s of training ({wall_time:.0f} s in all)"
            )
        if self.world > 1:
            dist.barrier()
        return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
