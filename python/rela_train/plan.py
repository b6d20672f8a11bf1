"""``fit --dry-run`` and ``embed --dry-run``: every check a start makes, and the resolved plan.

A dry run validates what a real start validates before it trains or writes anything (the
configuration, the data paths, the world size against the global batch, the run directory, the
prior or its store, TensorBoard), then prints the plan: per-rank batch, accumulation, steps,
evaluation cost, store and transition. It creates nothing, loads no prior model weights (a
``pixels``/``random`` prior is built, files are checked) and starts no process group: under
``torchrun`` it reads the world size from the environment, and ``--world-size N`` plans for N
ranks from one process. A problem is raised exactly as a real start raises it (one line naming
the flag).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from rela_train.config import TrainConfig

__all__ = ["Plan", "plan_embed", "plan_fit", "planned_world_size"]


@dataclass
class Plan:
    """What a start would do, as ``key: value`` lines (``notes``: what was adapted)."""

    title: str
    items: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, value: str) -> None:
        self.items.append((key, value))

    def lines(self) -> list[str]:
        width = max((len(k) for k, _ in self.items), default=0)
        out = [self.title]
        out += [f"  {key.ljust(width)}  {value}" for key, value in self.items]
        out += [f"  note: {note}" for note in self.notes]
        out.append("dry run: every check passed; nothing was trained or written")
        return out


def planned_world_size(world_size: int | None) -> int:
    """The world size to plan for: ``--world-size`` when given, else torchrun's ``WORLD_SIZE``
    (1 outside torchrun). Under torchrun the two must agree."""
    text = os.environ.get("WORLD_SIZE", "").strip()
    env = None
    if text:
        try:
            env = int(text)
        except ValueError:
            raise ValueError(f"WORLD_SIZE: expected a positive integer, got {text!r}") from None
        if env < 1:
            raise ValueError(f"WORLD_SIZE: expected a positive integer, got {text!r}")
    if world_size is None:
        return env or 1
    if env is not None and env != world_size:
        raise ValueError(
            f"--world-size: {world_size}, but torchrun started {env} ranks (WORLD_SIZE); drop "
            "--world-size under torchrun"
        )
    return world_size


def _images(n: int) -> str:
    return f"{n:,} image{'s' if n != 1 else ''}"


def plan_fit(
    config: TrainConfig,
    run_dir: Path,
    *,
    world: int,
    resume: bool | str = False,
    notes: list[str] | None = None,
) -> Plan:
    """Check a ``fit`` start of ``config`` in ``run_dir`` on ``world`` ranks and return its plan
    (``resume``: as :func:`rela_train.runs.fit` takes it, ``True`` or ``"auto"``).

    Raises what the start would raise (ValueError / OSError naming the flag)."""
    import rela_kernels as rk
    from rela_train.build import accumulation_steps, check_trainable, step_plan
    from rela_train.checkpoint import resume as resume_run
    from rela_train.checkpoint import should_resume
    from rela_train.config import RESUME_SETTINGS
    from rela_train.data.sources import build_sources
    from rela_train.run_directory import RunDirectory
    from rela_train.runtime import resolve_device
    from rela_train.tensorboard_log import check_tensorboard, tensorboard_dir

    resuming = should_resume(run_dir, resume)
    plan = Plan(f"rela-train fit --dry-run: {'resume ' if resuming else ''}{run_dir}")
    plan.notes += notes or []
    if resuming:
        if resume == "auto":  # the whole command must agree with the run's settings
            overrides = config.to_dict()
        else:
            overrides = {name: getattr(config, name) for name in RESUME_SETTINGS}
        resumed = resume_run(run_dir, overrides, world, plan.notes.append)
        config, state = resumed.config, resumed.state
        counters = state.get("counters") or {}
        plan.add(
            "resume",
            f"from {resumed.path.name}: epoch {counters.get('epoch', '?')}, step "
            f"{counters.get('global_step', '?')} (checkpoint of {state.get('world_size', 1)} "
            "rank(s))",
        )
    else:
        RunDirectory.check_new(run_dir)
    asked, transition = config.switch_transition, config.concrete_transition
    config = config.replace(switch_transition=transition)
    if config.tensorboard is not None:
        check_tensorboard(tensorboard_dir(config.tensorboard, run_dir), new=not resuming)
    device_text = config.device
    try:
        device = resolve_device(config.device)
        cuda = device.type == "cuda"
        device_text = str(device)
        if cuda and world > 1:
            device_text += " (cuda:LOCAL_RANK on each rank)"
    except ValueError as error:
        # The device belongs to the machine the job runs on, which need not be this one.
        cuda = config.device.startswith("cuda")
        device_text = f"{config.device} (not usable on this machine: {error})"
    if config.sync_bn and not cuda:
        raise ValueError("--sync-bn: synchronised BatchNorm needs CUDA training")
    accum = accumulation_steps(config, world)
    train, val = build_sources(config, warn=plan.notes.append)
    try:
        check_trainable(config, train.n, world)
        prior_text = _prior_text(config, train, run_dir)
        budget = 1.0 if config.policy == "inbatch" else config.budget
        policy = "random" if config.policy in ("random", "inbatch") else config.policy
        sampler = rk.SubsetSampler(
            train.n, budget, policy, score_table=rk.ScoreTable(train.n), seed=config.seed,
            num_replicas=world, rank=0, anneal=config.anneal_fraction, epochs=config.epochs,
        )  # fmt: skip
        steps = step_plan(config, sampler, accum, world)
        plan.add("world", f"{world} rank(s), device {device_text}")
        data = f"{train.name}: {_images(train.n)}; evaluation on {val.name}: {_images(val.n)}"
        plan.add("data", data)
        per_step = config.batch_size * accum * world
        batch = f"{config.batch_size} per rank x {accum} micro-batch(es) x {world} rank(s)"
        if config.policy == "inbatch":
            batch += f" (each micro-batch scores {steps.micro_batch} and keeps {config.batch_size})"
        plan.add("batch", f"{batch} = {per_step} images per optimizer step")
        plan.add(
            "steps",
            f"{steps.steps_per_epoch} per epoch ({sampler.epoch_size(0):,} of {train.n:,} images "
            f"at budget {config.budget:g}, policy {config.policy}), {steps.total_steps} in "
            f"{config.epochs} epochs, {steps.warmup_steps} warmup",
        )
        plan.add("prior", prior_text)
        plan.add("switch", _switch_text(config, asked, transition))
        plan.add("evaluation", _evaluation_text(config, train.n, val.n))
        plan.add("run directory", f"{run_dir.resolve()}{' (resumed)' if resuming else ' (new)'}")
    finally:
        for source in (train, val):
            source.close()
    return plan


def _prior_text(config: TrainConfig, train, run_dir: Path) -> str:
    from rela_train.data.sources import FolderSource
    from rela_train.prior.loaders import check_prior_spec
    from rela_train.prior.targets import check_prior_store

    if not config.rela:
        return "none (BYOL alone)"
    if config.prior_store is not None:
        return "--prior-store " + check_prior_store(config.prior_store, train)
    assert config.prior is not None
    text = check_prior_spec(config.prior)
    if isinstance(train, FolderSource) and train.fingerprint != train.folder.fingerprint:
        raise ValueError(
            "--prior: embedding a subset of an image folder is not supported; embed the "
            "folder with `rela-train embed` and train on the whole folder"
        )
    return f"--prior {text}; embedded into {run_dir / 'prior'} at start (all ranks)"


def _switch_text(config: TrainConfig, asked: str, transition: str) -> str:
    if not config.rela:
        return "none (BYOL from the first step)"
    rule = {"adaptive": "adaptive (EMA plateau, rk.AdaptiveSwitch)", "never": "never"}
    text = rule.get(config.switch, config.switch)
    how = transition
    if asked == "auto":
        how += " (auto: keep-views on in-memory small images where measured, hard on image folders)"
    return f"{text}; transition {how}"


def _evaluation_text(config: TrainConfig, train_n: int, val_n: int) -> str:
    bank = min(config.eval_bank, train_n) if config.eval_bank else train_n
    probe = {
        "lbfgs": f"the L-BFGS linear probe ({config.probe_epochs} iterations)",
        "official": f"the official linear probe ({config.probe_epochs} epochs)",
        "none": "no linear probe",
    }[config.probe if config.probe_epochs else "none"]
    if config.eval_every:
        passes = math.ceil(config.epochs / config.eval_every)
        text = (
            f"kNN (k={config.knn_k}) every {config.eval_every} epoch(s) on a bank of "
            f"{_images(bank)} against {_images(val_n)}: {passes} evaluation(s) of "
            f"{bank + val_n:,} forward passes each"
        )
    else:
        text = "no kNN during training"
    text += f"; at the end kNN on all {_images(train_n)} and {probe} on their features"
    if config.eval_steps:
        text += f"; kNN every {config.eval_steps} steps"
        if config.eval_steps_window:
            text += f" within {config.eval_steps_window} of the switch"
    return text


def plan_embed(args, *, world: int) -> Plan:
    """Check an ``embed`` start (``args`` of the command) on ``world`` ranks; its plan."""
    import rela_kernels as rk
    from rela_train.data.folder import ImageFolder
    from rela_train.prior.embedding import check_width, default_chunk_rows
    from rela_train.prior.loaders import check_prior_spec, load_prior

    plan = Plan(f"rela-train embed --dry-run: {args.out}")
    prior_text = check_prior_spec(args.prior)
    dataset = ImageFolder(args.data)
    n = len(dataset)
    identity, width = None, "the prior's width D"
    if args.prior.split(":")[0] in ("pixels", "random"):  # cheap to build: check what it makes
        prior = load_prior(
            args.prior, input_size=args.input_size, normalize=args.normalize, num_rows=n
        )
        identity, width = prior.identity, str(check_width(args.dim, prior.dim, n))
    out = Path(args.out)
    if rk.EmbeddingStore.exists(out):
        store = rk.EmbeddingStore.open(out)
        try:
            if store.n != n or store.fingerprint != dataset.fingerprint:
                raise ValueError(
                    f"--out: the store at {out} was made for other data ({store.n} rows) than "
                    f"{args.data} ({n} images); embed into a new directory"
                )
            if identity is not None and store.prior != identity:
                raise ValueError(
                    f"--out: the store at {out} was made with prior {store.prior!r}, but this "
                    f"run has {identity!r}; embed into a new directory"
                )
            chunk_rows = store.chunk_rows
            state = "complete" if store.complete else f"resumed at row {store.rows_done:,}"
            state = f"{out}: existing store, {state}, prior {store.prior}"
        finally:
            store.close()
    else:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"--out: {out} exists and is not an empty directory or a store")
        chunk_rows = args.chunk_rows or default_chunk_rows(n, args.batch_size)
        state = f"{out}: new store"
    chunks = math.ceil(n / chunk_rows)
    workers = args.workers
    if workers is None:
        per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", str(min(world, 8)))))
        workers = min(8, max(1, (os.cpu_count() or 1) // per_node))
    plan.add("world", f"{world} rank(s), device {args.device}")
    plan.add("data", f"{args.data}: {_images(n)} in {len(dataset.classes)} classes")
    plan.add("prior", prior_text)
    plan.add("store", state)
    plan.add(
        "chunks",
        f"{chunks} of {chunk_rows:,} rows, about {math.ceil(chunks / world)} per rank; batch "
        f"{args.batch_size}, {workers} decoding worker(s) per rank",
    )
    dims = width if identity is not None else (args.dim or "min(256, D, N - 1)")
    plan.add("transport", f"PCA whitening to {dims} dimensions")
    return plan
