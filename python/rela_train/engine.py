"""The training loop: BYOL + ReLA-F with per-epoch subsets, checkpoints and exact resume.

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

Distributed (``torchrun``, one process per GPU, or per CPU "rank" with gloo): the trained
modules are wrapped in ``DistributedDataParallel`` (gradients averaged in buckets that overlap the
backward pass; ``find_unused_parameters`` since each phase leaves some heads unused; no
all-reduce on accumulation micro-batches), BatchNorm is synced on multi-GPU CUDA runs, step losses
are averaged for the switch, the score table all-gathers, and only rank 0 writes files and
evaluates. Each step starts with one tiny all-reduce in which the ranks agree on stopping (a
signal seen by any rank stops all after the same step) and on skipping a step whose images were
all unreadable on some rank. Data are consumed per step as one global chunk of the epoch's order
(``global batch = micro-batch x accumulation x world``), sharded by ``rk.SubsetSampler``: a
checkpoint therefore resumes on another world size (same global batch, the accumulation or the
per-rank batch adapted) at the same position of the same epoch.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import rela_kernels as rk
from rela_kernels.atomic_io import atomic_write, atomic_write_text
from rela_kernels.selection import subset_size
from rela_train.byol import BYOL, byol_loss, hidden_width
from rela_train.config import RESUME_SETTINGS, TrainConfig
from rela_train.data.augment import RELA_VIEWS, Augmenter, byol_views
from rela_train.data.sources import Batch, FolderSource, Source, build_sources
from rela_train.data.views import CropPlan, stable_seed
from rela_train.evaluate import (
    extract_features,
    final_probe_results,
    knn_accuracy,
)
from rela_train.models import build_resnet, resnet_feature_dim
from rela_train.optim import (
    build_optimizer,
    ema_tau,
    lr_scale,
    parameter_groups,
    scheduled_lr_factor,
    set_learning_rates,
)
from rela_train.prior.targets import PriorTargets, prepare_prior
from rela_train.rela import ReLAHead, Switch, build_switch, rela_loss, transport_width
from rela_train.run_directory import RunDirectory
from rela_train.runtime import (
    DistributedError,
    agree_min,
    check_shared_directory,
    describe_failure,
    is_collective_failure,
    rank0_first,
    resolve_device,
)
from rela_train.runtime import setup as setup_distributed

__all__ = ["CHECKPOINT", "Hooks", "RunResult", "Trainer", "load_checkpoint"]

CHECKPOINT = "last.pt"
FORMAT = "rela-train-checkpoint-v1"
# What every checkpoint holds (see Trainer._state); checked before any of it is used.
_CHECKPOINT_KEYS = frozenset(
    ("format", "config", "learner", "optimizer", "score_table", "sampler", "sampler_policy",
     "switch", "counters", "evaluations", "channels", "classes")
)  # fmt: skip
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


class Learner(nn.Module):
    """Everything trained: BYOL (with its target), the ReLA head, the online linear probe."""

    def __init__(self, config: TrainConfig, channels: int, num_classes: int, rela_dim: int | None):
        super().__init__()
        backbone = build_resnet(
            config.arch, small_images=config.small_images, width=config.width, in_channels=channels
        )
        self.feature_dim = backbone.feature_dim
        hidden = hidden_width(config.proj_hidden_rule, config.proj_hidden, self.feature_dim)
        self.byol = BYOL(backbone, self.feature_dim, hidden, config.proj_dim)
        self.rela_head = (
            ReLAHead(self.feature_dim, rela_dim, frozen=config.rela_head == "frozen")
            if rela_dim is not None
            else None
        )
        self.probe = nn.Linear(self.feature_dim, num_classes)


def build_learner(
    config: TrainConfig, channels: int, num_classes: int, rela_dim: int | None
) -> Learner:
    """The model of a run, initialised from ``config.seed`` (without touching global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return Learner(config, channels, num_classes, rela_dim)


class _Objective(nn.Module):
    """One micro-batch's forward for the current phase: what DistributedDataParallel wraps, so
    that its gradient all-reduce overlaps the backward pass."""

    def __init__(self, learner: Learner, transport: rk.Transport | None) -> None:
        super().__init__()
        self.learner = learner
        # A plain attribute, not an input: DDP would try to move (rebuild) forward's inputs.
        self.transport = transport

    def forward(
        self, views: list[torch.Tensor], phase: str, prior: torch.Tensor | None, check: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(per-sample loss, score in [0, 2], probe logits)``."""
        byol = self.learner.byol
        transport = self.transport
        f1 = byol.backbone(views[0])
        f2 = byol.backbone(views[1])
        if phase == "rela":
            head = self.learner.rela_head
            assert head is not None and prior is not None and transport is not None
            per_sample = rela_loss((head(f1), head(f2)), prior, transport, check_finite=check)
            score = per_sample  # in [0, 2]
        else:
            q1, q2 = byol.predict(f1), byol.predict(f2)
            z1, z2 = byol.target(views[0]), byol.target(views[1])
            per_sample = byol_loss((q1, q2), (z1, z2), check_finite=check)
            score = per_sample / 4.0  # two 2 - 2cos terms: back to [0, 2], as ReLA's
        logits = self.learner.probe(f1.detach().float())
        return per_sample, score, logits


def _micro_batch(config: TrainConfig) -> int:
    """Images per micro-batch: ``inbatch`` scores batch_size / budget and keeps batch_size."""
    if config.selection == "inbatch":
        return max(config.batch_size, round(config.batch_size / config.budget))
    return config.batch_size


def _accumulation(config: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step on each rank (from --global-batch when it is set)."""
    if config.global_batch is None:
        return config.accum_steps
    per_pass = config.batch_size * world
    if config.global_batch % per_pass:
        raise ValueError(
            f"--global-batch: {config.global_batch} images per step is not a multiple of "
            f"--batch-size x world size = {config.batch_size} x {world} = {per_pass}"
        )
    return config.global_batch // per_pass


# Settings a resumed run may have changed since its checkpoint: the output only, or adapted to a
# new world size (see Trainer._adapt_to_world).
_RESUME_MAY_DIFFER = {*RESUME_SETTINGS, "batch_size", "accum_steps"}


def _check_checkpoint_config(state: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """Refuse a checkpoint written under other settings than the run's ``config.json``."""
    saved = state.get("config", {})
    current = config.to_dict()
    differ = sorted(
        key
        for key in set(saved) | set(current)
        if key not in _RESUME_MAY_DIFFER and saved.get(key) != current.get(key)
    )
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} vs {current.get(k)!r}" for k in differ[:6])
        raise ValueError(
            f"--resume: the checkpoint in {run_dir} was written by a run with other settings "
            f"than {run_dir / 'config.json'} ({shown}); it comes from another run or preset, "
            "so it is not loaded"
        )


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :class:`Trainer` (a file, or a run directory).

    Loaded with ``weights_only=True``: a checkpoint holds only tensors, plain containers and
    primitive values, so a crafted file cannot run code here; anything else is refused."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():
            # The weights-only unpickler warns about pickle protocols before refusing them.
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False, which would run the file's code.
        raise ValueError(
            f"{path} is not a safe, valid rela-train checkpoint (damaged, or holding objects "
            "other than tensors and plain values); refused without running any of it"
        ) from error
    except Exception as error:  # zip/pickle errors of a damaged or foreign file
        raise ValueError(f"{path} is not a valid rela-train checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a valid rela-train checkpoint (no {FORMAT} marker)")
    missing = sorted(_CHECKPOINT_KEYS - set(state))
    if missing or not isinstance(state.get("config"), dict):
        what = ", ".join(missing) or "config"
        raise ValueError(f"{path} is not a valid rela-train checkpoint (missing {what})")
    return state


class _Stop:
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

    def __enter__(self) -> _Stop:
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One run: ``Trainer(config, run_dir).fit()`` (or ``resume=True`` to continue it)."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        hooks: Hooks | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.hooks = hooks or Hooks()
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.stop = _Stop()
        self._agreed_stop = False  # the stop decision all ranks reached at the last step
        self._resume_state = None
        if resume:
            saved = TrainConfig.load(self.run_dir / "config.json")
            # Only settings that cannot change the results may differ on resume.
            config = saved.replace(**{name: getattr(config, name) for name in RESUME_SETTINGS})
            self._resume_state = load_checkpoint(self.run_dir)
            _check_checkpoint_config(self._resume_state, config, self.run_dir)
        else:
            RunDirectory.check_new(self.run_dir)  # before anything is created
        self._run: RunDirectory | None = None
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
                config = self._adapt_to_world(config, self._resume_state)
            self.config = config
            self.accum_steps = _accumulation(config, self.world)
            cuda = self.device.type == "cuda"
            self.autocast = config.amp == "bf16" or (config.amp == "auto" and cuda)
            self.channels_last = cuda if config.channels_last is None else config.channels_last
            self.sync_bn = (cuda and self.world > 1) if config.sync_bn is None else config.sync_bn
            if self.sync_bn and not cuda:
                raise ValueError("--sync-bn: synchronised BatchNorm needs CUDA training")
            self._build()
        except BaseException:
            if self._run is not None:
                self._run.abandon()  # a failed start leaves nothing behind
            self._close_sources()
            self.dist.close()
            raise

    def _adapt_to_world(self, config: TrainConfig, state: dict[str, Any]) -> TrainConfig:
        """The resumed run's config on this world size: the same global batch (and so the same
        learning rate, steps and data order), reached by another accumulation or per-rank batch;
        a world size that cannot reach it is refused with the reason."""
        old_world = int(state.get("world_size", 1))
        if old_world == self.world:
            return config
        batch, accum = config.batch_size, _accumulation(config, old_world)
        if (accum * old_world) % self.world == 0:
            changes = {"accum_steps": accum * old_world // self.world}
        elif config.selection != "inbatch" and (batch * old_world) % self.world == 0:
            changes = {"batch_size": batch * old_world // self.world}
        else:
            raise ValueError(
                f"--resume: the checkpoint in {self.run_dir} was trained on {old_world} ranks "
                f"with {batch} images x {accum} micro-batches per rank per step (global batch "
                f"{batch * accum * old_world}); on {self.world} ranks no whole per-rank batch "
                "or accumulation gives the same global batch; resume on a world size that "
                f"divides {accum * old_world} (or {batch * old_world} images)"
            )
        if config.global_batch is not None:
            changes.pop("accum_steps", None)  # derived from the global batch
        adapted = config.replace(**changes)
        self.log(
            f"resuming a {old_world}-rank checkpoint on {self.world} ranks: per rank "
            f"{adapted.batch_size} images x {_accumulation(adapted, self.world)} micro-batches "
            f"(global batch {batch * accum * old_world}, unchanged)"
        )
        return adapted

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        if getattr(self, "main", True):
            self._log(message)

    def _build(self) -> None:
        config = self.config
        # Everything that can be checked without the run directory is checked before it is
        # created or locked.
        self.train_source, self.val_source = build_sources(
            config, warn=self.log, pin_memory=self.device.type == "cuda"
        )
        train = self.train_source
        self._check_trainable(train.n)
        self._open_run_directory()
        check_shared_directory(self.dist, self.run_dir)
        self.prior: PriorTargets | None = None
        if config.rela:
            # Rank 0 computes the embeddings (no time limit); the others then open the store.
            self.prior = rank0_first(
                self.dist,
                f"prior of {self.run_dir.resolve()}",
                lambda: prepare_prior(
                    source=train,
                    prior=config.prior,
                    prior_store=config.prior_store,
                    run_dir=self.run_dir,
                    dim=transport_width(
                        config.rela_dim_rule,
                        config.rela_dim,
                        resnet_feature_dim(config.arch, config.width),
                    ),
                    device=self.device,
                    log=self.log,
                    preprocess=config.prior_preprocess,
                ),
            )
        self.learner = build_learner(
            config, train.channels, len(train.classes), self.prior.dim if self.prior else None
        ).to(self.device)
        if self.sync_bn:
            self.learner = nn.SyncBatchNorm.convert_sync_batchnorm(self.learner)
        if self.channels_last:
            self.learner.to(memory_format=torch.channels_last)
        byol = self.learner.byol
        if config.compile:
            byol.backbone.compile()
            byol.target_backbone.compile()
        transport = self.prior.transport if self.prior is not None else None
        self.objective: nn.Module = _Objective(self.learner, transport)
        if self.world > 1:
            cuda = self.device.type == "cuda"
            self.objective = nn.parallel.DistributedDataParallel(
                self.objective,
                device_ids=[self.device.index] if cuda else None,
                find_unused_parameters=True,  # each phase leaves some heads unused
                broadcast_buffers=not self.sync_bn,
            )

        # Epoch geometry: `inbatch` scores large batches of batch_size / budget images and
        # back-propagates batch_size of them, so every policy takes the same optimizer steps.
        self.inbatch = config.selection == "inbatch"
        sampler_budget = 1.0 if self.inbatch else config.budget
        self.micro_batch = _micro_batch(config)
        # On the training device. The sampler reads the table only when an epoch starts, so the
        # epoch's scores are kept on the device and written (all-gathered) once, when the epoch
        # ends or a checkpoint is due: no per-step host sync or collective.
        self.score_table = rk.ScoreTable(train.n, self.device)
        self._pending_scores: list[tuple[torch.Tensor, torch.Tensor]] = []
        policy = "random" if config.selection in ("random", "inbatch") else config.selection
        samplers = {
            name: rk.SubsetSampler(
                train.n,
                sampler_budget,
                name,
                score_table=self.score_table,
                seed=config.seed,
                num_replicas=self.world,
                rank=self.rank,
                anneal=config.anneal_fraction,
                epochs=config.epochs,
            )
            for name in {policy, "random"}
        }
        # hard/easy on a table that holds no losses yet would pick the lowest indices (the tie
        # rule), so epoch 0 draws at random; later epochs rank real losses (samples never seen
        # keep the initial 2.0, the largest possible score).
        self._samplers = samplers
        self._policy = policy
        self.sampler = samplers[policy]
        # Each step consumes the next `step_images` positions of the epoch's global order, all
        # ranks together (see rk.SubsetSampler.local_indices); a world-size-free count of steps.
        self.step_images = self.micro_batch * self.accum_steps * self.world
        self.steps_per_epoch = self._epoch_steps(0)
        # Annealed epochs (--anneal) take the full data: more steps than the pruned ones.
        self.total_steps = sum(self._epoch_steps(e) for e in range(config.epochs))
        self.warmup_steps = round(config.warmup_epochs * self.steps_per_epoch)

        # Optimizer: BYOL online network and the ReLA head follow the schedule; the probe keeps
        # its own fixed learning rate and no weight decay.
        scale = lr_scale(config.lr_scaling, config.batch_size * self.accum_steps * self.world)
        lr = config.lr * scale
        groups = []
        for module in byol.online_modules():
            groups += parameter_groups(
                module, base_lr=lr, weight_decay=config.weight_decay, tag="byol"
            )
        if self.learner.rela_head is not None and not self.learner.rela_head.frozen:
            groups += parameter_groups(
                self.learner.rela_head, base_lr=lr, weight_decay=config.weight_decay, tag="rela"
            )
        groups += parameter_groups(
            self.learner.probe, base_lr=config.probe_lr, weight_decay=0.0, tag="probe"
        )
        for group in groups:
            if group["name"].startswith("probe"):
                group["lars_exclude"] = True
        self.optimizer = build_optimizer(
            config.optimizer,
            groups,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            eta=config.lars_eta,
        )
        self.switch: Switch = build_switch(
            config.switch, self.total_steps, const_switch=config.const_switch, epochs=config.epochs
        )
        if not config.rela:
            self.switch.switched = True
        channels = train.channels
        mean, std = train.mean[:channels], train.std[:channels]
        self.augment = {
            "byol": Augmenter(byol_views(config.byol_blur == "on"), config.image_size, mean, std),
            "rela": Augmenter(RELA_VIEWS, config.image_size, mean, std),
        }
        # Counters (restored on resume).
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.samples_seen = 0
        self.samples_scored = 0
        self.train_time = 0.0
        self._wall_before = 0.0
        self._wall_start = time.perf_counter()
        self.switch_step: int | None = None
        self.switch_epoch: int | None = None
        self.metrics_lines = 0
        self.evaluations: list[dict[str, Any]] = []

    def _epoch_steps(self, epoch: int) -> int:
        """Optimizer steps of epoch ``epoch`` (annealed epochs see every sample)."""
        return max(1, self.sampler.epoch_size(epoch) // self.step_images)

    def _check_trainable(self, images: int) -> None:
        """Refuse a run in which some rank's micro-batch would hold fewer than two images
        (BatchNorm needs two): it could not train a single step."""
        config = self.config
        subset = subset_size(images, 1.0 if config.selection == "inbatch" else config.budget)
        per_rank = min(_micro_batch(config), math.ceil(subset / self.world))
        if per_rank < 2:
            raise ValueError(
                f"--train-subset/--budget: an epoch takes {subset} of the {images} training "
                f"images, {per_rank} per rank and micro-batch on {self.world} rank(s); BatchNorm "
                "needs at least 2 images per micro-batch, so no step could be trained: use more "
                "images or a larger --budget"
            )

    def _open_run_directory(self) -> None:
        """Rank 0 creates (new runs) and locks the run directory; every rank learns whether it
        could, so that a refusal stops all ranks at once."""
        error: BaseException | None = None
        if self.main:
            try:
                self._run = RunDirectory.open(self.run_dir, new=self._resume_state is None)
            except (ValueError, OSError) as caught:
                error = caught
        (ok,) = agree_min(self.dist, [int(error is None)])
        if error is not None:
            raise error
        if not ok:
            raise ValueError(f"--out: rank 0 could not open the run directory {self.run_dir}")

    def _close_sources(self) -> None:
        for source in (self.train_source, self.val_source, self._eval_bank):
            if source is not None:
                source.close()

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "score_table": self.score_table.state_dict(),
            "sampler": self.sampler.state_dict(),
            "sampler_policy": self.sampler.policy,
            "switch": self.switch.state_dict(),
            "counters": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "samples_seen": self.samples_seen,
                "samples_scored": self.samples_scored,
                "train_time": self.train_time,
                "wall_time": self.wall_time,
                "switch_step": self.switch_step,
                "switch_epoch": self.switch_epoch,
                "metrics_lines": self.metrics_lines,
                "skipped_images": self.train_source.skipped,
            },
            "evaluations": self.evaluations,
            "world_size": self.world,
            "feature_dim": self.learner.feature_dim,
            "channels": self.train_source.channels,
            "classes": self.train_source.classes,
        }

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
            buffer = io.BytesIO()
            torch.save(self._state(), buffer)
            atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
        return path

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.learner.load_state_dict(state["learner"])
        except RuntimeError as error:
            raise ValueError(
                f"--resume: the checkpoint's model does not match this run's model ({error})"
            ) from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.score_table.load_state_dict(state["score_table"])
        self.sampler = self._samplers[state["sampler_policy"]]
        self.sampler.load_state_dict(state["sampler"])
        self.steps_per_epoch = self._epoch_steps(self.sampler.epoch)
        self.switch.load_state_dict(state["switch"])
        counters = state["counters"]
        for name in (
            "epoch",
            "step_in_epoch",
            "global_step",
            "samples_seen",
            "samples_scored",
            "train_time",
            "switch_step",
            "switch_epoch",
            "metrics_lines",
        ):
            setattr(self, name, counters[name])
        self.train_source.skipped = counters["skipped_images"]
        self._wall_before = counters["wall_time"]
        self.evaluations = list(state["evaluations"])
        # Drop metric lines written after the checkpoint: the resumed run rewrites them.
        metrics = self.run_dir / "metrics.jsonl"
        if self.main and metrics.exists():
            lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
            atomic_write_text(metrics, "".join(lines[: self.metrics_lines]))

    # ------------------------------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------------------------------

    def _write_metrics(self, record: dict[str, Any]) -> None:
        self.metrics_lines += 1
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        return "byol" if self.switch.switched else "rela"

    def _autocast(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _to_device(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
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
        phase = self.phase
        if batch.views is not None:
            crops = batch.views.to(self.device, non_blocking=True)
            views = self.augment[phase].photometric(crops, g)
        else:
            images = batch.images.to(self.device, non_blocking=True)
            views = self.augment[phase](images, g)
        return self._to_device(views)

    def _micro_step(self, batch: Batch, g: torch.Generator, scale: float) -> torch.Tensor:
        """Forward and backward one micro-batch; returns float64 ``[loss sum, rows, probe loss
        sum, probe hits, scored loss sum, scored rows]`` (the scored ones differ from the first
        two with ``inbatch`` only)."""
        phase = self.phase
        indices = batch.indices
        views = self._views(batch, g)
        prior = None
        if phase == "rela":
            assert self.prior is not None
            prior = self.prior.rows(indices, self.device)
        if self.inbatch:
            chosen, scores = self._inbatch_select(views, indices, prior)
            self._pending_scores.append((indices, scores))
            self.samples_scored += indices.shape[0]
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
            per_sample, score, logits = self.objective(views, phase, prior, check)
            probe_loss = F.cross_entropy(logits, labels)
        loss = (per_sample * weights).mean() + probe_loss
        (loss * scale).backward()
        if not self.inbatch:
            self._pending_scores.append((indices, score.detach().float()))
        rows = indices.shape[0]
        correct = (logits.argmax(dim=1) == labels).sum()
        # Sums of the step's statistics, kept on the device (one host sync per step, later).
        # inbatch: the scored batch's loss sum and size (what the switch rule is fed).
        scored = scores.double().sum() if self.inbatch else per_sample.detach().double().sum()
        scored_rows = batch.indices.shape[0] if self.inbatch else rows
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
        self._reset_scores()
        self.switch_step, self.switch_epoch = self.global_step, self.epoch
        rho = "" if math.isnan(self.switch.rho) else f" (rho={self.switch.rho:.5f})"
        self.log(f"switch to BYOL after step {self.global_step}, epoch {self.epoch + 1}{rho}")

    def _reset_scores(self) -> None:
        """At the switch, loss-based policies start over with BYOL losses: the ReLA-phase scores
        (written and pending) are dropped and the table is back to its initial 2.0, so samples
        are never ranked by losses of two objectives. The same point on every rank."""
        self._pending_scores = []
        self.score_table.reset()

    def _agree(self, loaded: int) -> tuple[bool, bool]:
        """``(skip this step, stop after it)``, the same on every rank: a step is skipped when
        some rank has no readable micro-batch; a stop asked of any rank stops all of them."""
        least, stop = agree_min(self.dist, [loaded, -int(self.stop.requested)])
        return least == 0, stop < 0

    def _optimizer_step(self, batches: list[Batch]) -> dict[str, Any]:
        config = self.config
        phase = self.phase
        factor = scheduled_lr_factor(
            config.lr_schedule, self.global_step, self.total_steps, self.warmup_steps
        )
        set_learning_rates(self.optimizer, factor, fixed=("probe",))
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        scale = 1.0 / len(batches)
        ddp = isinstance(self.objective, nn.parallel.DistributedDataParallel)
        for micro, batch in enumerate(batches):
            seed = stable_seed(config.seed, self.epoch, self.step_in_epoch, micro, self.rank)
            g = torch.Generator().manual_seed(seed)
            # Gradients are all-reduced (by DDP) only in the step's last backward pass.
            last = micro == len(batches) - 1
            with self.objective.no_sync() if ddp and not last else nullcontext():
                totals += self._micro_step(batch, g, scale)
        if self.world > 1:
            dist.all_reduce(totals)
        self.optimizer.step()
        tau = ema_tau(config.tau_schedule, self.global_step, self.total_steps, config.ema_base)
        self.learner.byol.update_target(tau)
        totals = totals.cpu()  # the step's one host sync: the switch needs the loss now
        self.global_step += 1
        rows = max(1.0, float(totals[1]))
        loss = float(totals[0]) / rows
        self.samples_seen += int(totals[1])
        # inbatch back-propagates the hardest rows: the switch rule sees the scored batch.
        switch_loss = float(totals[4]) / max(1.0, float(totals[5]))
        switched = phase == "rela" and self.switch.after_step(switch_loss, self.global_step)
        if switched and self.switch_step is None:
            self._switched()
        lr = next(g["lr"] for g in self.optimizer.param_groups if g["name"] == "byol")
        rho = self.switch.rho
        return {
            "step": self.global_step,
            "epoch": self.epoch,
            "phase": phase,
            "loss": loss,
            "rho": None if math.isnan(rho) else rho,
            "lr": lr,
            "tau": tau,
            "samples_seen": self.samples_seen,
            "probe_loss": float(totals[2]) / rows,
            "probe_acc": float(totals[3]) / rows,
        }

    # ------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------

    def _features(self, source: Source) -> tuple[torch.Tensor, torch.Tensor]:
        backbone = self.learner.byol.backbone
        was_training = backbone.training
        backbone.eval()
        try:
            return extract_features(
                backbone,
                source,
                size=self.config.image_size,
                device=self.device,
                channels_last=self.channels_last,
                autocast=self.autocast,
            )
        finally:
            backbone.train(was_training)

    def evaluate(self, *, final: bool) -> dict[str, Any]:
        """kNN accuracy (per epoch: on the eval bank); at the end also the linear probe."""
        try:
            return self._evaluate(final)
        finally:
            # Evaluation's decoding processes are not kept between evaluations (the training
            # source's are: they serve every epoch).
            for source in (self.val_source, self._eval_bank):
                if source is not None and source is not self.train_source:
                    source.close()

    def _evaluate(self, final: bool) -> dict[str, Any]:
        config = self.config
        start = time.perf_counter()
        bank = self.train_source
        if not final and config.eval_bank is not None:
            if self._eval_bank is None:
                self._eval_bank = self.train_source.subset(config.eval_bank, seed=1)
            bank = self._eval_bank
        train_f, train_y = self._features(bank)
        val_f, val_y = self._features(self.val_source)
        classes = len(self.train_source.classes)
        result: dict[str, Any] = {
            "knn_acc": knn_accuracy(
                train_f,
                train_y,
                val_f,
                val_y,
                k=config.knn_k,
                temperature=config.knn_t,
                num_classes=classes,
            )  # fmt: skip
        }
        if final and config.eval_bank is not None and config.eval_bank < self.train_source.n:
            # The accuracy curve's last point uses the same bank as the per-epoch points.
            if self._eval_bank is None:
                self._eval_bank = self.train_source.subset(config.eval_bank, seed=1)
            bank_f, bank_y = self._features(self._eval_bank)
            result["knn_acc_bank"] = knn_accuracy(
                bank_f, bank_y, val_f, val_y, k=config.knn_k, temperature=config.knn_t,
                num_classes=classes,
            )  # fmt: skip
        if final:
            result.update(
                final_probe_results(
                    config.probe, train_f, train_y, val_f, val_y, classes, config.probe_epochs
                )
            )
        result["eval_time"] = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------

    def _pending_steps(self) -> list[list[torch.Tensor]]:
        """This rank's micro-batches (sample indices), grouped by step, for the rest of the
        epoch: step ``s`` takes the global positions ``[s, s + 1) x step_images`` of the epoch's
        order, sharded by the sampler."""
        accum = self.accum_steps
        remaining = self.steps_per_epoch - self.step_in_epoch
        order = self.sampler.local_indices(start=self.step_in_epoch * self.step_images)
        size = min(self.micro_batch, order.shape[0])
        count = max(1, min(remaining * accum, order.shape[0] // size))
        micro = [order[i * size : (i + 1) * size] for i in range(count)]
        return [group for r in range(remaining) if (group := micro[r * accum : (r + 1) * accum])]

    def _crop_plan(self) -> CropPlan:
        """How the loader crops this epoch's views (sources that crop in the loader)."""
        specs = self.augment[self.phase].views
        return CropPlan(specs, self.config.image_size, self.config.seed, self.epoch)

    def request_stop(self) -> None:
        """Stop after the current step with a checkpoint (what SIGTERM/SIGINT do)."""
        self.stop.requested = True

    def fit(self) -> RunResult:
        try:
            return self._fit()
        except Exception as error:
            if self.world > 1 and is_collective_failure(error):
                checkpoint = self.run_dir / "checkpoints" / CHECKPOINT
                raise DistributedError(describe_failure(self.dist, error, checkpoint)) from error
            raise
        finally:
            self._close_sources()
            if self._run is not None:
                self._run.release()
            self.dist.close()

    def _fit(self) -> RunResult:
        config = self.config
        self._wall_start = time.perf_counter()
        if self._resume_state is not None:
            self._restore(self._resume_state)
            self._resume_state = None
            self.log(
                f"resuming {self.run_dir} at epoch {self.epoch + 1}/{config.epochs}, step "
                f"{self.step_in_epoch}/{self.steps_per_epoch}"
            )
            mid_epoch = self.step_in_epoch > 0
            if self.main:  # the per-rank batch or accumulation may have changed (world size)
                atomic_write_text(self.run_dir / "config.json", config.to_json())
        else:
            if self.main:
                atomic_write_text(self.run_dir / "config.json", config.to_json())
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            mid_epoch = False
        self._log_start()
        with self.stop:
            while self.epoch < config.epochs:
                if not mid_epoch:
                    if self.switch.before_epoch(self.epoch) and self.switch_step is None:
                        self._switched()
                    # A table without scores of the current objective (the first epoch, or
                    # right after the switch reset it) would rank by index: draw at random.
                    fresh = self.epoch == 0 or self.switch_step == self.global_step
                    warmup = fresh and self._policy in ("hard", "easy")
                    self.sampler = self._samplers["random" if warmup else self._policy]
                    self.sampler.set_epoch(self.epoch)
                    self.steps_per_epoch = self._epoch_steps(self.epoch)
                    self.step_in_epoch = 0
                mid_epoch = False
                if self._run_epoch() == "stopped":
                    self.flush_scores()
                    self.save_checkpoint()
                    self.log(
                        f"stopped at epoch {self.epoch + 1}, step {self.step_in_epoch}; a "
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
            f"{config.budget:g} ({config.selection}), {config.epochs} epochs x "
            f"{self.steps_per_epoch} steps, {config.arch} width {config.width}, device "
            f"{self.device}, {torch.get_num_threads()} threads"
        )

    def _run_epoch(self) -> str:
        config = self.config
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {self.epoch + 1}/{config.epochs}",
            disable=not (config.progress and self.main),
            dynamic_ncols=True,
            leave=False,
        )
        with bar:
            while self.step_in_epoch < self.steps_per_epoch:
                if self._run_steps(bar) == "stopped":
                    return "stopped"
        if self.global_step == 0:  # the same on every rank: skips are agreed
            raise ValueError(
                f"{self.train_source.name}: no step of epoch {self.epoch + 1} could be trained: "
                f"every batch had fewer than 2 readable images ({self.train_source.skipped} "
                "unreadable images skipped); check the training data"
            )
        self._end_epoch()
        stop = self._agreed_stop if self.world > 1 else self.stop.requested
        if stop and self.epoch < config.epochs:
            return "stopped"
        return "done"

    def _run_steps(self, bar: tqdm) -> str:
        """Steps until the epoch ends, a stop, or a phase switch that changes the loader's
        crops ("restart": the stream is rebuilt for the new phase from the next step)."""
        pending = self._pending_steps()
        flat = [b for group in pending for b in group]
        phase = self.phase
        stream = self.train_source.batches(flat, self._crop_plan())
        crops_in_loader = isinstance(self.train_source, FolderSource)
        for group in pending:
            start = time.perf_counter()
            loaded = []
            for _ in group:
                batch = next(stream, None)
                # Unreadable images shrink a batch; BatchNorm needs at least two rows.
                if batch is not None and batch.indices.shape[0] >= 2:
                    loaded.append(batch)
            skip, self._agreed_stop = self._agree(len(loaded))
            if skip:
                self.log(f"step {self.step_in_epoch}: no readable images on some rank; skipped")
                self.step_in_epoch += 1
                continue
            record = self._optimizer_step(loaded)
            self.step_in_epoch += 1
            elapsed = time.perf_counter() - start
            self.train_time += elapsed
            rows = sum(int(batch.indices.shape[0]) for batch in loaded) * self.world
            record["img_per_s"] = rows / max(elapsed, 1e-9)
            record["train_time"] = self.train_time
            self._write_metrics(record)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", phase=record["phase"],
                img_s=f"{record['img_per_s']:.0f}",
            )  # fmt: skip
            bar.update(1)
            if self.hooks.on_step_end is not None:
                self.hooks.on_step_end(self)
            stop = self._agreed_stop if self.world > 1 else self.stop.requested
            if stop and self.step_in_epoch < self.steps_per_epoch:
                return "stopped"
            more = self.step_in_epoch < self.steps_per_epoch
            if crops_in_loader and self.phase != phase and more:
                return "restart"
        return "done"

    def _end_epoch(self) -> None:
        config = self.config
        epoch = self.epoch
        record: dict[str, Any] = {
            "event": "epoch",
            "epoch": epoch,
            "step": self.global_step,
            "phase": self.phase,
            "samples_seen": self.samples_seen,
            "train_time": self.train_time,
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
                    f"({self.phase}, {self.samples_seen} samples, {self.train_time:.0f} s)"
                )
            if self.world > 1:
                dist.barrier()
        self._write_metrics(record)
        self.epoch += 1
        self.step_in_epoch = 0
        self.flush_scores()
        self.save_checkpoint()
        if self.hooks.on_epoch_end is not None:
            self.hooks.on_epoch_end(self)

    @property
    def wall_time(self) -> float:
        """Seconds this run has existed in processes, over all its resumptions."""
        return self._wall_before + time.perf_counter() - self._wall_start

    def _finish(self) -> dict[str, Any]:
        config = self.config
        summary: dict[str, Any] = {}
        if self.main:
            result = self.evaluate(final=True)
            wall_time = self.wall_time
            self.evaluations.append(
                {
                    "epoch": self.epoch - 1,
                    "samples_seen": self.samples_seen,
                    "train_time": self.train_time,
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
                "steps": self.global_step,
                "budget": config.budget,
                "selection": config.selection,
                "prior": config.prior or config.prior_store,
                "switch": config.switch if config.rela else None,
                "switch_step": self.switch_step,
                "switch_epoch": self.switch_epoch,
                "last_rho": None if math.isnan(self.switch.rho) else self.switch.rho,
                "samples_seen": self.samples_seen,
                "samples_scored": self.samples_scored,
                "train_time": self.train_time,
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
                f"{self.samples_seen} samples in "
                f"{self.train_time:.0f} s of training ({wall_time:.0f} s in all)"
            )
        if self.world > 1:
            dist.barrier()
        return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
