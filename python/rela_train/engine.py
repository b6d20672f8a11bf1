"""The training loop: BYOL + ReLA-F with per-epoch subsets, checkpoints and exact resume.

The run's parts are set up by :mod:`rela_train.build` and held as one
:class:`~rela_train.build.RunParts`; this module drives them. Around the loop: checkpoints and
resuming (:mod:`rela_train.checkpoint`), stop signals and the ranks' agreement
(:mod:`rela_train.stop`), the metrics records (:mod:`rela_train.metrics_log`), evaluations
(:class:`rela_train.evaluate.RunEvaluator`, :mod:`rela_train.step_evals`) and the summary
(:mod:`rela_train.summary`).

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
thread count) and rewrites ``metrics.jsonl`` from the checkpoint on. Checkpoints are written at
the end of each epoch, every ``--checkpoint-every`` steps or minutes, and when a stop is asked.

Distributed (``torchrun``, one process per GPU, or per CPU "rank" with gloo): the trained modules
are wrapped in ``DistributedDataParallel``, one wrapper per kind of step over the parameters it
trains (:mod:`rela_train.parallel`; gradients averaged in buckets that overlap the backward pass;
no all-reduce on accumulation micro-batches), BatchNorm is synced on multi-GPU CUDA runs, step
losses are averaged for the switch, the score table all-gathers, and only rank 0 writes files and
evaluates. Each step starts with one tiny all-reduce in which the ranks agree on stopping, on a
time-based checkpoint and on skipping a step whose images were all unreadable on some rank
(:meth:`rela_train.stop.StopController.agree`). Data are consumed per step as one global chunk of
the epoch's order (``global batch = micro-batch x accumulation x world``), sharded by
``rk.SubsetSampler``: a checkpoint therefore resumes on another world size (same global batch, the
accumulation or the per-rank batch adapted) at the same position of the same epoch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from rela_kernels.atomic_io import atomic_write_text
from rela_train.build import RunParts, build_run, epoch_steps
from rela_train.checkpoint import (
    CheckpointClock,
    Counters,
    checkpoint_path,
    checkpoint_state,
    load_run_config,
    restore,
    save_checkpoint,
    should_resume,
    write_checkpoint,
)
from rela_train.checkpoint import resume as resume_run
from rela_train.config import RESUME_SETTINGS, TrainConfig, parse_step_window
from rela_train.data.sources import Batch, FolderSource
from rela_train.data.views import CropPlan, stable_seed
from rela_train.evaluate import RunEvaluator
from rela_train.metrics_log import MetricsLog
from rela_train.optim import ema_tau, scheduled_lr_factor, set_learning_rates
from rela_train.parallel import PhaseParallel
from rela_train.provenance import run_provenance
from rela_train.runtime import (
    DistributedError,
    describe_failure,
    is_collective_failure,
    resolve_device,
)
from rela_train.runtime import setup as setup_distributed
from rela_train.step_evals import StepEvalRunner, StepEvaluations
from rela_train.stop import StopController, stop_raises
from rela_train.summary import start_line, summary_line, write_summary
from rela_train.tensorboard_log import check_tensorboard, tensorboard_dir
from rela_train.train_step import MicroStep, PendingScores
from rela_train.transition import parse_transition

__all__ = ["TIME_FIELDS", "Hooks", "RunResult", "Trainer"]

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
    signal: int | None = None  # the signal that stopped the run on this rank, if one did


def _part(name: str) -> property:
    return property(lambda self: getattr(self.parts, name), doc=f"``RunParts.{name}``")


class Trainer:
    """One run: ``Trainer(config, run_dir).run()``; ``resume=True`` continues the run in
    ``run_dir`` (only the settings that cannot change the results are taken from ``config``),
    ``resume="auto"`` continues it if it holds a checkpoint and starts it otherwise (then
    ``config`` must agree with the run's).

    The parts come from :func:`rela_train.build.build_run` (``self.parts``); where the run
    stands is ``self.counters`` (:class:`~rela_train.checkpoint.Counters`)."""

    train_source = _part("train_source")
    val_source = _part("val_source")
    learner = _part("learner")
    objective = _part("objective")
    prior = _part("prior")
    score_table = _part("score_table")
    samplers = _part("samplers")
    optimizer = _part("optimizer")
    switch = _part("switch")
    augment = _part("augment")
    channels_last = _part("channels_last")
    accum_steps = _part("accum_steps")
    total_steps = _part("total_steps")

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike[str],
        *,
        resume: bool | Literal["auto"] = False,
        hooks: Hooks | None = None,
        log: Callable[[str], None] | None = None,
        preset: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.hooks = hooks or Hooks()
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        # Start-up has no step boundary to stop at (embedding the prior can take hours): a
        # SIGUSR1/SIGTERM stops it at once (stop.stop_raises); the store keeps its chunks.
        with stop_raises():
            self._build(config, resume, preset)

    def _build(
        self, config: TrainConfig, resume: bool | Literal["auto"], preset: str | None
    ) -> None:
        config, resuming, overrides = _run_config(config, self.run_dir, resume)
        device = _device(config)
        self.dist = setup_distributed(device, config.dist_timeout)
        self.world, self.rank, self.main = self.dist.world, self.dist.rank, self.dist.main
        try:
            if device.type == "cuda" and self.world > 1:
                device = torch.device("cuda", self.dist.local_rank)
            self.device = device
            self._resumed = None
            if resuming:
                self._resumed = resume_run(self.run_dir, overrides, self.world, self.log)
                config = self._resumed.config
            # config.json records the transition itself, so a later change of what `auto`
            # means cannot change how a run resumes.
            config = config.replace(switch_transition=config.concrete_transition)
            self.config = config
            self.parts: RunParts = build_run(
                config, self.run_dir, device, self.dist, new=not resuming, log=self.log
            )
            self._assemble(config, device, preset)
        except BaseException:
            self._release_parts(abandon=True)
            self.dist.close()
            raise

    def _assemble(self, config: TrainConfig, device: torch.device, preset: str | None) -> None:
        """The loop's own state and helpers, around the built parts."""
        self.transition = parse_transition(config.switch_transition)
        self.sampler = self.samplers[self.parts.policy]
        self.steps_per_epoch = self.parts.steps_per_epoch  # of the current epoch
        self.counters = Counters()  # restored on resume
        self.evaluations: list[dict[str, Any]] = []
        self.metrics = MetricsLog(self.run_dir, main=self.main)
        self.stop = StopController(self.dist)
        self.checkpoint_clock = CheckpointClock(config.checkpoint_every)
        autocast = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
        self.micro_step = MicroStep(config, self.parts, device, self.transition, autocast=autocast)
        self.evaluator = RunEvaluator(
            config, self.train_source, self.val_source, device=device,
            channels_last=self.channels_last, autocast=autocast,
        )  # fmt: skip
        self.step_evals = _step_eval_runner(config, self.evaluator, self.metrics, self.world)
        self.pending_scores = PendingScores(self.score_table, self.world, device)
        # Preset, data fingerprint and code version (a resumed run's comes from its checkpoint).
        self.provenance = run_provenance(preset, self.train_source.fingerprint)
        self._wall_start = time.perf_counter()

    def _release_parts(self, *, abandon: bool = False) -> None:
        """Close the data sources and unlock the run directory; ``abandon``: the start failed
        after the parts were built, so what it created goes too (RunDirectory.abandon)."""
        parts = getattr(self, "parts", None)
        if parts is None:
            return
        for source in (parts.train_source, parts.val_source):
            if source is not None:
                source.close()
        if parts.run_directory is not None:
            if abandon:
                parts.run_directory.abandon()
            else:
                parts.run_directory.release()

    def log(self, message: str) -> None:
        if getattr(self, "main", True):
            self._log(message)

    @property
    def step_images(self) -> int:
        """Positions of the epoch's order each step consumes, all ranks together."""
        return self.parts.micro_batch * self.accum_steps * self.world

    @property
    def wall_time(self) -> float:
        """Seconds this run has existed in processes, over all its resumptions."""
        return self.counters.wall_time + time.perf_counter() - self._wall_start

    def save_checkpoint(self, *, step: bool = False) -> Path:
        """Write a checkpoint now (``step``: a step checkpoint); a collective."""
        return write_checkpoint(self, step=step)

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

    def _reset_scores(self) -> None:
        """At the switch, loss-based policies start over with BYOL losses: the ReLA-phase scores
        (written and pending) are dropped and the table is back to its initial 2.0, so samples
        are never ranked by losses of two objectives. The same point on every rank."""
        self.pending_scores.clear()
        self.score_table.reset()

    def step(self, batches: list[Batch]) -> dict[str, Any]:
        """One optimizer step on this rank's micro-batches ``batches`` (a collective when
        distributed); returns the step's metrics record."""
        config, counters = self.config, self.counters
        phase, since = self.phase, self.steps_since_switch()
        factor = scheduled_lr_factor(
            config.lr_schedule, counters.global_step, self.total_steps, self.parts.warmup_steps
        ) * self.transition.lr_multiplier(since)
        set_learning_rates(self.optimizer, factor, fixed=("probe",))
        self.optimizer.zero_grad(set_to_none=True)
        totals = self._backward(batches, phase, since)
        if self.world > 1:
            dist.all_reduce(totals)
        self.optimizer.step()
        tau = ema_tau(config.tau_schedule, counters.global_step, self.total_steps, config.ema_base)
        self.learner.byol.update_target(tau)
        totals = totals.cpu()  # the step's one host sync: the switch needs the loss now
        counters.global_step += 1
        counters.samples_seen += int(totals[1])
        # inbatch back-propagates the hardest rows; the switch rule may see the scored batch.
        switch_loss = float(totals[4]) / max(1.0, float(totals[5]))
        switched = phase == "rela" and self.switch.after_step(switch_loss, counters.global_step)
        if switched and counters.switch_step is None:
            self._switched()
        return _step_record(self, totals, phase, since, tau)

    def _backward(self, batches: list[Batch], phase: str, since: int | None) -> torch.Tensor:
        """Forward and backward every micro-batch; the sums of their statistics."""
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        scale = 1.0 / len(batches)
        ddp = isinstance(self.objective, PhaseParallel)
        epoch, step = self.counters.epoch, self.counters.step_in_epoch
        for micro, batch in enumerate(batches):
            g = torch.Generator().manual_seed(
                stable_seed(self.config.seed, epoch, step, micro, self.rank)
            )
            # Gradients are all-reduced (by DDP) only in the step's last backward pass.
            last = micro == len(batches) - 1
            with self.objective.no_sync() if ddp and not last else nullcontext():
                result = self.micro_step(batch, g, scale, phase, since, self.sampler)
            totals += result.totals
            self.pending_scores.add(result.indices, result.scores)
            self.counters.samples_scored += result.scored
        return totals

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
        """``--eval-steps``: the evaluations due after this step (off the training clock)."""
        if self.step_evals is not None:
            step, switch_step = self.counters.global_step, self.counters.switch_step
            self.step_evals.after_step(step, switch_step, self.learner.byol.backbone)

    def evaluate(self, *, final: bool, backbone: nn.Module | None = None) -> dict[str, Any]:
        """kNN accuracy (per epoch: on the eval bank); at the end also the linear probe.
        ``backbone``: another network than the run's."""
        return self.evaluator(backbone or self.learner.byol.backbone, final=final)

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------

    def pending_steps(self) -> list[list[torch.Tensor]]:
        """This rank's micro-batches (sample indices), grouped by step, for the rest of the
        epoch: step ``s`` takes the global positions ``[s, s + 1) x step_images`` of the epoch's
        order, sharded by the sampler."""
        accum, micro_batch = self.accum_steps, self.parts.micro_batch
        remaining = self.steps_per_epoch - self.counters.step_in_epoch
        order = self.sampler.local_indices(start=self.counters.step_in_epoch * self.step_images)
        size = min(micro_batch, order.shape[0])
        count = max(1, min(remaining * accum, order.shape[0] // size))
        micro = [order[i * size : (i + 1) * size] for i in range(count)]
        return [group for r in range(remaining) if (group := micro[r * accum : (r + 1) * accum])]

    def crop_plan(self) -> CropPlan:
        """How the loader crops this epoch's views (sources that crop in the loader)."""
        specs = self.augment[self.transition.view_phase(self.phase)].views
        return CropPlan(specs, self.config.image_size, self.config.seed, self.counters.epoch)

    def request_stop(self) -> None:
        """Stop after the current step with a checkpoint (what SIGUSR1/SIGTERM/SIGINT do)."""
        self.stop.request()

    def run(self) -> RunResult:
        """Train to the end, or until a stop: then a checkpoint is written."""
        try:
            return self._train()
        except Exception as error:
            if self.world > 1 and is_collective_failure(error):
                checkpoint = checkpoint_path(self.run_dir)
                raise DistributedError(describe_failure(self.dist, error, checkpoint)) from error
            raise
        finally:
            self.metrics.close()
            self.evaluator.close()
            self._release_parts()
            if isinstance(self.objective, PhaseParallel):
                self.objective.close()  # before the process group goes (PhaseParallel.close)
            self.dist.close()

    def _start(self) -> None:
        """Restore the checkpoint of a resumed run, write config.json, open the metrics."""
        config, resumed = self.config, self._resumed
        self._wall_start = time.perf_counter()
        if resumed is not None:
            restore(self, resumed.state)
            self._resumed = None
            # An annealed epoch (--anneal) takes more steps than a pruned one.
            self.steps_per_epoch = epoch_steps(self.sampler, self.sampler.epoch, self.step_images)
            self.log(
                f"resuming {self.run_dir} from {resumed.path.name} at epoch "
                f"{self.counters.epoch + 1}/{config.epochs}, step "
                f"{self.counters.step_in_epoch}/{self.steps_per_epoch}"
            )
        if self.main:  # on resume, the per-rank batch or accumulation may have changed
            atomic_write_text(self.run_dir / "config.json", config.to_json())
        board = None
        if config.tensorboard is not None:
            board = tensorboard_dir(config.tensorboard, self.run_dir)
        resume_step = None if resumed is None else self.counters.global_step
        self.metrics.start(tensorboard=board, resume_step=resume_step)
        self.log(start_line(self))

    def _train(self) -> RunResult:
        config = self.config
        with self.stop:  # a stop asked while the run restores stops at the first step boundary
            self._start()
            summary = self.run_dir / "summary.json"
            if self.counters.epoch >= config.epochs and summary.is_file():
                self.log(f"{self.run_dir} holds a finished run: nothing to train")
                done = json.loads(summary.read_text(encoding="utf-8")) if self.main else {}
                return RunResult("finished", self.run_dir, done)
            while self.counters.epoch < config.epochs:
                if self.counters.step_in_epoch == 0:
                    self._start_epoch()
                if self._run_epoch() == "stopped":
                    self.save_checkpoint()
                    self.log(
                        f"stopped by {self.stop.describe()} at epoch {self.counters.epoch + 1}, "
                        f"step {self.counters.step_in_epoch}; a checkpoint is in "
                        f"{self.run_dir / 'checkpoints'}. Continue with: rela-train fit "
                        f"--resume {self.run_dir}"
                    )
                    return RunResult("interrupted", self.run_dir, signal=self.stop.signum)
        return RunResult("finished", self.run_dir, self._finish())

    def _start_epoch(self) -> None:
        """The switch rule's epoch-start decision, then the epoch's subset and its steps."""
        config, counters = self.config, self.counters
        if self.switch.before_epoch(counters.epoch) and counters.switch_step is None:
            self._switched()
            self._step_evaluations()  # the snapshots and the state at the switch
        # A table without scores of the current objective (the first epoch, or right after the
        # switch reset it) would rank by index: draw at random.
        reset = config.switch_scores == "reset" and counters.switch_step == counters.global_step
        fresh = counters.epoch == 0 or reset
        policy = self.parts.policy
        warmup = fresh and policy in ("hard", "easy")
        self.sampler = self.samplers["random" if warmup else policy]
        self.sampler.set_epoch(counters.epoch)
        self.steps_per_epoch = epoch_steps(self.sampler, counters.epoch, self.step_images)

    def _run_epoch(self) -> str:
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.counters.step_in_epoch,
            desc=f"epoch {self.counters.epoch + 1}/{self.config.epochs}",
            disable=not (self.config.progress and self.main),
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
                "trained: every batch had fewer than 2 readable images "
                f"({self.train_source.skipped} unreadable images skipped); check the training data"
            )
        self._end_epoch()
        if self.stop.should_stop() and self.counters.epoch < self.config.epochs:
            return "stopped"
        return "done"

    def _run_steps(self, bar: tqdm) -> str:
        """Steps until the epoch ends, a stop, or a phase switch that changes the loader's
        crops ("restart": the stream is rebuilt for the new phase from the next step)."""
        pending = self.pending_steps()
        phase = self.phase
        stream = self.train_source.batches([b for g in pending for b in g], self.crop_plan())
        crops_in_loader = isinstance(self.train_source, FolderSource)
        for group in pending:
            start = time.perf_counter()
            # Unreadable images shrink a batch; BatchNorm needs at least two rows.
            loaded = [b for _ in group if (b := next(stream, None)) is not None
                      and b.indices.shape[0] >= 2]  # fmt: skip
            due = self.checkpoint_clock.due(self.counters.global_step + 1)
            agreed = self.stop.agree(len(loaded), checkpoint=due)
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
            self.metrics.write(record)
            self._step_evaluations()  # after the clock stopped: not training time
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", phase=record["phase"],
                img_s=f"{record['img_per_s']:.0f}",
            )  # fmt: skip
            bar.update(1)
            if self.hooks.on_step_end is not None:
                self.hooks.on_step_end(self)
            more = self.counters.step_in_epoch < self.steps_per_epoch
            if self.stop.should_stop() and more:
                return "stopped"
            if agreed.checkpoint and more:  # the end of an epoch writes its own
                self.save_checkpoint(step=True)
            if crops_in_loader and self.phase != phase and more:
                return "restart"
        return "done"

    def _end_epoch(self) -> None:
        config, counters = self.config, self.counters
        record = _epoch_record(self)
        last = counters.epoch + 1 == config.epochs
        if config.eval_every and (counters.epoch + 1) % config.eval_every == 0 and not last:
            if self.main:
                result = self.evaluate(final=False)
                record.update(result)
                self.evaluations.append(
                    {k: record[k] for k in ("epoch", "samples_seen", "train_time", "knn_acc")}
                )
                self.log(
                    f"epoch {counters.epoch + 1}/{config.epochs}: kNN {result['knn_acc']:.4f} "
                    f"({self.phase}, {counters.samples_seen} samples, "
                    f"{counters.train_time:.0f} s)"
                )
            if self.world > 1:
                dist.barrier()
        self.metrics.write(record)
        counters.epoch += 1
        counters.step_in_epoch = 0
        self.save_checkpoint()
        if self.hooks.on_epoch_end is not None:
            self.hooks.on_epoch_end(self)

    def _finish(self) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        if self.main:
            summary = write_summary(self, self.evaluate(final=True))
            save_checkpoint(checkpoint_path(self.run_dir), checkpoint_state(self))
            self.log(summary_line(summary))
        if self.world > 1:
            dist.barrier()
        return summary


def _step_record(
    trainer: Trainer, totals: torch.Tensor, phase: str, since: int | None, tau: float
) -> dict[str, Any]:
    """The metrics record of the step just taken (``totals``: its statistics, on the host)."""
    rows = max(1.0, float(totals[1]))
    lr = next(g["lr"] for g in trainer.optimizer.param_groups if g["name"] == "byol")
    rho = trainer.switch.rho
    transition = trainer.transition
    extra = {}
    if since is not None and not transition.hard:
        extra = {
            "since_switch": since,
            "rela_weight": transition.rela_weight(since),
            "backbone_frozen": transition.freeze_backbone(since),
        }
    return {
        **extra,
        "step": trainer.counters.global_step,
        "epoch": trainer.counters.epoch,
        "phase": phase,
        "loss": float(totals[0]) / rows,
        "rho": None if math.isnan(rho) else rho,
        "lr": lr,
        "tau": tau,
        "samples_seen": trainer.counters.samples_seen,
        "probe_loss": float(totals[2]) / rows,
        "probe_acc": float(totals[3]) / rows,
    }


def _run_config(
    config: TrainConfig, run_dir: Path, resume: bool | str
) -> tuple[TrainConfig, bool, dict[str, Any]]:
    """``(config, resuming, overrides)`` before anything is created: the run's own config when
    it is resumed (its device, threads and time limit), and what the caller asks to change of
    it (``resume="auto"``: the whole ``config``, which must agree with the run's)."""
    resuming = should_resume(run_dir, resume)
    if resume == "auto":
        overrides = config.to_dict()
    else:
        overrides = {n: getattr(config, n) for n in RESUME_SETTINGS}
    if resuming:
        config = load_run_config(run_dir, overrides)
    if config.tensorboard is not None:
        check_tensorboard(tensorboard_dir(config.tensorboard, run_dir), new=not resuming)
    return config, resuming, overrides


def _device(config: TrainConfig) -> torch.device:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return resolve_device(config.device)
    except ValueError as error:
        raise ValueError(f"--device: {error}") from error


def _step_eval_runner(
    config: TrainConfig, evaluator: RunEvaluator, metrics: MetricsLog, world: int
) -> StepEvalRunner | None:
    if not config.eval_steps:
        return None
    window = config.eval_steps_window
    schedule = StepEvaluations(
        config.eval_steps, None if window is None else parse_step_window(window)
    )
    return StepEvalRunner(
        schedule, lambda backbone: evaluator(backbone, final=False), metrics,
        world=world, rela=config.rela,
    )  # fmt: skip


def _epoch_record(trainer: Trainer) -> dict[str, Any]:
    counters = trainer.counters
    return {
        "event": "epoch",
        "epoch": counters.epoch,
        "step": counters.global_step,
        "phase": trainer.phase,
        "samples_seen": counters.samples_seen,
        "train_time": counters.train_time,
        "skipped_images": trainer.train_source.skipped,
    }
