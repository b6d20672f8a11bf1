"""Setting up a run from its config: data, prior, model (DDP-wrapped when distributed), samplers,
optimizer groups, the switch and the augmentations, returned as one :class:`RunParts`.

Nothing here draws from the global random generators (the learner is initialised under its own
fork of them), and the construction order is part of a run's identity: keep it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rela_kernels as rk
from rela_kernels.selection import subset_size
from rela_train.backbone_io import check_state_matches, load_backbone_file, load_into
from rela_train.config import TrainConfig
from rela_train.data.augment import RELA_VIEWS, Augmenter, byol_views
from rela_train.data.sources import Source, build_sources
from rela_train.learner import Learner, Objective, build_learner
from rela_train.models import build_resnet, resnet_feature_dim
from rela_train.models.cpu_formats import channels_last_hazard
from rela_train.optim import build_optimizer, lr_scale, parameter_groups
from rela_train.parallel import PhaseParallel
from rela_train.peers import rank0_first
from rela_train.prior.targets import (
    PriorJob,
    PriorTargets,
    embed_with_all_ranks,
    prepare_prior,
)
from rela_train.rela import Switch, build_switch, rela_dim_cap
from rela_train.run_directory import RunDirectory
from rela_train.runtime import DistContext, agree_min, check_shared_directory

__all__ = [
    "RunParts",
    "StepPlan",
    "accumulation_steps",
    "adapt_batch_to_world",
    "build_optimizer_groups",
    "build_run",
    "check_trainable",
    "epoch_steps",
    "micro_batch_size",
    "read_initial_backbone",
    "step_plan",
]


def micro_batch_size(config: TrainConfig) -> int:
    """Images per micro-batch: ``inbatch`` scores batch_size / budget and keeps batch_size."""
    if config.policy == "inbatch":
        return max(config.batch_size, round(config.batch_size / config.budget))
    return config.batch_size


def accumulation_steps(config: TrainConfig, world: int) -> int:
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


def adapt_batch_to_world(config: TrainConfig, world: int) -> tuple[TrainConfig, str | None]:
    """A preset's per-rank batch adapted so that its ``--global-batch`` holds on ``world``
    ranks: when ``batch_size x world`` does not divide the global batch but ``world`` does, the
    per-rank batch becomes the largest divisor of ``global_batch / world`` not above the preset's
    and at least 2 (e.g. 4096 on 32 ranks: 128 per rank, one pass). Returns the config and a
    note saying so (None when nothing changed). Only for a per-rank batch the user did not give."""
    if config.global_batch is None or config.global_batch % (config.batch_size * world) == 0:
        return config, None
    if config.global_batch % world:
        return config, None  # no per-rank batch can hold it: accumulation_steps says why
    per_rank = config.global_batch // world
    fits = [b for b in range(2, min(config.batch_size, per_rank) + 1) if per_rank % b == 0]
    if not fits:  # BatchNorm needs two images per micro-batch
        return config, None
    batch = max(fits)
    note = (
        f"--batch-size: the preset's {config.batch_size} images per rank cannot make the global "
        f"batch of {config.global_batch} on {world} ranks; {batch} per rank x "
        f"{per_rank // batch} micro-batch(es) do"
    )
    return config.replace(batch_size=batch), note


@dataclass(frozen=True)
class StepPlan:
    """The epoch geometry of a run: what each optimizer step takes and how many there are."""

    micro_batch: int  # images per micro-batch and rank (inbatch: scored)
    step_images: int  # positions of the epoch's order one optimizer step consumes, all ranks
    steps_per_epoch: int  # of the first epoch (annealed epochs take more)
    total_steps: int
    warmup_steps: int


def step_plan(config: TrainConfig, sampler: rk.SubsetSampler, accum_steps: int, world: int):
    """The :class:`StepPlan` of ``config`` on ``world`` ranks, from the run's sampler."""
    micro_batch = micro_batch_size(config)
    # Each step consumes the next `step_images` positions of the epoch's global order, all
    # ranks together (see rk.SubsetSampler.local_indices); a world-size-free count of steps.
    step_images = micro_batch * accum_steps * world
    steps_per_epoch = epoch_steps(sampler, 0, step_images)
    # Annealed epochs (--anneal) take the full data: more steps than the pruned ones.
    total_steps = sum(epoch_steps(sampler, e, step_images) for e in range(config.epochs))
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    return StepPlan(micro_batch, step_images, steps_per_epoch, total_steps, warmup_steps)


def epoch_steps(sampler: rk.SubsetSampler, epoch: int, step_images: int) -> int:
    """Optimizer steps of epoch ``epoch`` when each step takes ``step_images`` positions of the
    epoch's order (annealed epochs, ``--anneal``, see every sample: more steps)."""
    return max(1, sampler.epoch_size(epoch) // step_images)


@dataclass
class RunParts:
    """What :func:`build_run` sets up; the trainer holds it and reads each part from it."""

    train_source: Source
    val_source: Source
    run_directory: RunDirectory | None  # the lock rank 0 holds; None on the other ranks
    prior: PriorTargets | None
    learner: Learner
    objective: Objective | PhaseParallel  # data-parallel when distributed
    inbatch: bool
    micro_batch: int
    score_table: rk.ScoreTable
    samplers: dict[str, rk.SubsetSampler]  # by policy: the run's and "random"
    policy: str  # the sampler policy of the run (inbatch and random sample at random)
    step_images: int
    steps_per_epoch: int  # of the first epoch (annealed epochs take more)
    total_steps: int
    warmup_steps: int
    optimizer: torch.optim.Optimizer
    switch: Switch
    augment: dict[str, Augmenter]  # by phase
    channels_last: bool  # the memory format the learner trains in (asked for, unless unsafe)
    accum_steps: int  # micro-batches per optimizer step on each rank


def build_run(
    config: TrainConfig,
    run_dir: Path,
    device: torch.device,
    dist: DistContext,
    *,
    new: bool,
    log: Callable[[str], None],
) -> RunParts:
    """Set up the run in ``run_dir`` (``new``: create it; else it is resumed). A failure leaves
    nothing behind: sources are closed and a directory created here is removed."""
    accum_steps = accumulation_steps(config, dist.world)
    cuda = device.type == "cuda"
    channels_last = cuda if config.channels_last is None else config.channels_last
    sync_bn = (cuda and dist.world > 1) if config.sync_bn is None else config.sync_bn
    if sync_bn and not cuda:
        raise ValueError("--sync-bn: synchronised BatchNorm needs CUDA training")
    train = val = None
    run_directory = None
    try:
        # Everything that can be checked without the run directory is checked before it is
        # created or locked.
        train, val = build_sources(config, warn=log, pin_memory=device.type == "cuda")
        check_trainable(config, train.n, dist.world)
        # A resumed run's weights come from its checkpoint: the file is read for a new run only.
        initial = read_initial_backbone(config, train.channels) if new else None
        run_directory = _open_run_directory(run_dir, dist, new=new)
        check_shared_directory(dist, run_dir)
        return _build_parts(
            config, run_dir, device, dist, train, val, run_directory,
            accum_steps=accum_steps, sync_bn=sync_bn, channels_last=channels_last, log=log,
            initial_backbone=initial,
        )  # fmt: skip
    except BaseException:
        if run_directory is not None:
            run_directory.abandon()  # a failed start leaves nothing behind
        for source in (train, val):
            if source is not None:
                source.close()
        raise


def _build_parts(
    config: TrainConfig,
    run_dir: Path,
    device: torch.device,
    dist: DistContext,
    train: Source,
    val: Source,
    run_directory: RunDirectory | None,
    *,
    accum_steps: int,
    sync_bn: bool,
    channels_last: bool,
    log: Callable[[str], None],
    initial_backbone: dict[str, torch.Tensor] | None = None,
) -> RunParts:
    world = dist.world
    prior: PriorTargets | None = None
    if config.rela:
        dim = rela_dim_cap(
            config.rela_dim_rule, config.rela_dim, resnet_feature_dim(config.arch, config.width)
        )
        if world > 1 and config.prior_store is None:
            # Every rank embeds its share of the training set into RUN/prior.
            job = PriorJob(train, config.prior, run_dir, dim, device, log, config.prior_preprocess)
            embed_with_all_ranks(dist, job)
        # Rank 0 computes the embeddings (alone) or finds them computed, and fits the transport
        # (no time limit); the others then open the store.
        prior = rank0_first(
            dist,
            f"prior of {run_dir.resolve()}",
            lambda: prepare_prior(
                source=train,
                prior=config.prior,
                prior_store=config.prior_store,
                run_dir=run_dir,
                dim=dim,
                device=device,
                log=log,
                preprocess=config.prior_preprocess,
            ),
            advice=(
                f"What rank 0 finished of the prior is kept in {run_dir / 'prior'}; rerun the "
                "same `rela-train fit` command (any number of ranks) to continue from there"
            ),
        )
    learner = build_learner(
        config, train.channels, len(train.classes), prior.dim if prior else None
    )
    if initial_backbone is not None:
        # Both networks start from the file, as a run's target starts as a copy of its online net.
        for backbone in (learner.byol.backbone, learner.byol.target_backbone):
            load_into(backbone, initial_backbone, "--init-backbone")
    learner = learner.to(device)
    if sync_bn:
        learner = nn.SyncBatchNorm.convert_sync_batchnorm(learner)
    if channels_last and device.type != "cuda":
        hazard = channels_last_hazard(learner)  # models/cpu_formats.py: a oneDNN AVX2 bug
        if hazard is not None:
            log(f"warning: --channels-last: off for this CPU run: {hazard}")
            channels_last = False
    if channels_last:
        learner.to(memory_format=torch.channels_last)
    byol = learner.byol
    if config.compile:
        byol.backbone.compile()
        byol.target_backbone.compile()
    target_map = prior.transport if prior is not None else None
    objective: Objective | PhaseParallel = Objective(learner, target_map)
    if world > 1:
        # One DDP wrapper per kind of step, over the parameters it trains (parallel.py).
        objective = PhaseParallel(objective, device=device, sync_buffers=not sync_bn)

    # Epoch geometry: `inbatch` scores large batches of batch_size / budget images and
    # back-propagates batch_size of them, so every policy takes the same optimizer steps.
    inbatch = config.policy == "inbatch"
    sampler_budget = 1.0 if inbatch else config.budget
    micro_batch = micro_batch_size(config)
    # On the training device. The sampler reads the table only when an epoch starts, so the
    # epoch's scores are kept on the device and written (all-gathered) once, when the epoch
    # ends or a checkpoint is due: no per-step host sync or collective.
    score_table = rk.ScoreTable(train.n, device)
    policy = "random" if config.policy in ("random", "inbatch") else config.policy
    # hard/easy on a table that holds no losses yet would pick the lowest indices (the tie
    # rule), so epoch 0 draws at random; later epochs rank real losses (samples never seen
    # keep the initial 2.0, the largest possible score).
    samplers = {
        name: rk.SubsetSampler(
            train.n,
            sampler_budget,
            name,
            score_table=score_table,
            seed=config.seed,
            num_replicas=world,
            rank=dist.rank,
            anneal=config.anneal_fraction,
            epochs=config.epochs,
        )
        for name in {policy, "random"}
    }
    plan = step_plan(config, samplers[policy], accum_steps, world)
    step_images, steps_per_epoch = plan.step_images, plan.steps_per_epoch
    total_steps, warmup_steps = plan.total_steps, plan.warmup_steps

    scale = lr_scale(config.lr_scaling, config.batch_size * accum_steps * world)
    lr = config.lr * scale
    optimizer = build_optimizer(
        config.optimizer,
        build_optimizer_groups(learner, config, lr),
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        eta=config.lars_eta,
    )
    switch = build_switch(
        config.switch, total_steps, const_switch=config.const_switch, epochs=config.epochs
    )
    if not config.rela:
        switch.switched = True
    channels = train.channels
    mean, std = train.mean[:channels], train.std[:channels]
    augment = {
        "byol": Augmenter(byol_views(config.byol_blur == "on"), config.image_size, mean, std),
        "rela": Augmenter(RELA_VIEWS, config.image_size, mean, std),
    }
    return RunParts(
        train_source=train,
        val_source=val,
        run_directory=run_directory,
        prior=prior,
        learner=learner,
        objective=objective,
        inbatch=inbatch,
        micro_batch=micro_batch,
        score_table=score_table,
        samplers=samplers,
        policy=policy,
        step_images=step_images,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        optimizer=optimizer,
        switch=switch,
        augment=augment,
        channels_last=channels_last,
        accum_steps=accum_steps,
    )


def read_initial_backbone(config: TrainConfig, channels: int) -> dict[str, torch.Tensor] | None:
    """The tensors of ``--init-backbone``, checked against the run's backbone (arch, width,
    stem, ``channels`` input channels) before anything is created; None without the flag."""
    if config.init_backbone is None:
        return None
    state = load_backbone_file(config.init_backbone, "--init-backbone")
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # shapes only
        expected = build_resnet(
            config.arch, small_images=config.small_images, width=config.width, in_channels=channels
        )
    check_state_matches(expected, state, "--init-backbone")
    return state


def build_optimizer_groups(
    learner: Learner, config: TrainConfig, lr: float
) -> list[dict[str, Any]]:
    """Parameter groups: BYOL's online network and the ReLA head follow the schedule from
    ``lr``; the probe keeps its own fixed learning rate, no weight decay and no LARS."""
    groups = []
    for module in learner.byol.online_modules():
        groups += parameter_groups(
            module,
            base_lr=lr,
            weight_decay=config.weight_decay,
            tag="byol",
            decay_exclude=config.decay_exclude,
        )
    if learner.rela_head is not None and not learner.rela_head.frozen:
        groups += parameter_groups(
            learner.rela_head,
            base_lr=lr,
            weight_decay=config.weight_decay,
            tag="rela",
            decay_exclude=config.decay_exclude,
        )
    groups += parameter_groups(
        learner.probe, base_lr=config.probe_lr, weight_decay=0.0, tag="probe"
    )
    for group in groups:
        if group["name"].startswith("probe"):
            group["lars_exclude"] = True
    return groups


def check_trainable(config: TrainConfig, images: int, world: int) -> None:
    """Refuse a run in which some rank's micro-batch would hold fewer than two images
    (BatchNorm needs two): it could not train a single step."""
    subset = subset_size(images, 1.0 if config.policy == "inbatch" else config.budget)
    per_rank = min(micro_batch_size(config), math.ceil(subset / world))
    if per_rank < 2:
        raise ValueError(
            f"--train-subset/--budget: an epoch takes {subset} of the {images} training "
            f"images, {per_rank} per rank and micro-batch on {world} rank(s); BatchNorm "
            "needs at least 2 images per micro-batch, so no step could be trained: use more "
            "images or a larger --budget"
        )


def _open_run_directory(run_dir: Path, dist: DistContext, *, new: bool) -> RunDirectory | None:
    """Rank 0 creates (new runs) and locks the run directory; every rank learns whether it
    could, so that a refusal stops all ranks at once."""
    error: BaseException | None = None
    run_directory = None
    if dist.main:
        try:
            run_directory = RunDirectory.open(run_dir, new=new)
        except (ValueError, OSError) as caught:
            error = caught
    try:
        (ok,) = agree_min(dist, [int(error is None)])
    except BaseException:
        if run_directory is not None:
            run_directory.abandon()
        raise
    if error is not None:
        raise error
    if not ok:
        raise ValueError(f"--out: rank 0 could not open the run directory {run_dir}")
    return run_directory
