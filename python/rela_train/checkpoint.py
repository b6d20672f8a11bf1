"""A run's checkpoints: what they hold, writing them durably, and resuming a run from them.

This module is the one owner of saving and resuming. Each part of a run saves and restores its
own state (``state_dict()`` / ``load_state_dict()``: the learner, optimizer, score table,
sampler, switch, metrics log and step evaluations); :func:`checkpoint_state` gathers them with
the :class:`Counters` and the config, and :func:`restore` hands them back. :func:`resume` is the
one way a run is continued (``fit --resume RUN``, ``fit --resume auto``, ``Trainer(...,
resume=True)``): it reads ``config.json`` with the allowed changes, picks the newest readable
checkpoint, checks that it belongs to the run and adapts the run to the world size.

Files (in ``RUN/checkpoints/``): ``last.pt`` is always the newest checkpoint (end of an epoch, a
stop, the end of the run, or a step checkpoint). Step checkpoints (``--checkpoint-every``) are
written as ``step-NNNNNNNNN.pt`` and ``last.pt`` is then replaced by a hard link to it; the
newest ``--keep-checkpoints`` of them are kept, older ones deleted only once the new one is
durable (written, fsynced and renamed into place, the directory fsynced). A kill at any point
leaves the previous checkpoint whole; a full disk fails the write with the path named and
leaves it whole too.

No random generator carries state from one step to the next: every draw is seeded from (seed,
epoch, step, micro-batch, rank), so the counters and the sampler's epoch order are all a
checkpoint needs to resume the data and augmentation streams bit for bit, wherever in an epoch
it was written. Files are read with ``weights_only=True``: a checkpoint never runs code.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rela_kernels.atomic_io import atomic_write, fsync_dir
from rela_train.backbone_io import load_weights_only
from rela_train.build import accumulation_steps
from rela_train.config import RESUME_SETTINGS, TrainConfig, parse_checkpoint_every
from rela_train.provenance import run_provenance
from rela_train.run_directory import CHECKPOINT, CHECKPOINTS, RunDirectory, checkpoint_path
from rela_train.runtime import agree_min

if TYPE_CHECKING:  # the trainer imports this module, not the other way round
    from rela_train.engine import Trainer

__all__ = [
    "CHECKPOINT",
    "CheckpointClock",
    "FORMAT",
    "RESUME_MAY_DIFFER",
    "Counters",
    "Resumed",
    "adapt_to_world",
    "check_checkpoint_config",
    "checkpoint_path",
    "checkpoint_state",
    "has_checkpoint",
    "load_checkpoint",
    "load_run_config",
    "restore",
    "resume",
    "save_checkpoint",
    "save_step_checkpoint",
    "should_resume",
    "step_checkpoints",
    "write_checkpoint",
]

FORMAT = "rela-train-checkpoint-v1"
_STEP_FILE = re.compile(r"step-(\d{9})\.pt")
# What every checkpoint holds (see checkpoint_state); checked before any of it is used.
_CHECKPOINT_KEYS = frozenset(
    ("format", "config", "learner", "optimizer", "score_table", "sampler", "sampler_policy",
     "switch", "counters", "evaluations", "channels", "classes")
)  # fmt: skip


@dataclass
class Counters:
    """Where a run stands; the field names are the checkpoint's ``counters`` keys."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    samples_scored: int = 0
    train_time: float = 0.0
    # Seconds the run spent in earlier processes (the checkpoint stores the total at saving).
    wall_time: float = 0.0
    switch_step: int | None = None
    switch_epoch: int | None = None
    # Records in metrics.jsonl (kept by the MetricsLog; saved here).
    metrics_lines: int = 0
    # Unreadable training images skipped so far (the training source keeps the live count).
    skipped_images: int = 0


_COUNTER_NAMES = tuple(f.name for f in dataclasses.fields(Counters))

# Settings a resumed run may have changed since its checkpoint: the output only, or adapted to a
# new world size (see adapt_to_world).
RESUME_MAY_DIFFER = {*RESUME_SETTINGS, "batch_size", "accum_steps"}


def has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    return checkpoint_path(run_dir).is_file() or bool(step_checkpoints(run_dir))


def step_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The step checkpoints of a run, newest first."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _STEP_FILE.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def should_resume(run_dir: Path, resume: bool | str) -> bool:
    """Whether to continue the run in ``run_dir``: ``resume`` itself, or with ``"auto"``
    whether it holds a checkpoint (otherwise a new run starts there, which must be allowed:
    a directory holding another program's run files is refused, naming the flag)."""
    if resume != "auto":
        return bool(resume)
    if has_checkpoint(run_dir):
        return True
    try:
        RunDirectory.check_new(run_dir)
    except ValueError as error:
        raise ValueError(f"--resume auto: {str(error).removeprefix('--out: ')}") from error
    return False


class CheckpointClock:
    """When step checkpoints are due (``--checkpoint-every``): after every N-th optimizer step
    of the run (the same steps however often it was resumed), or once the given wall time has
    passed since the last checkpoint this process wrote (or its start)."""

    def __init__(self, every: str | None) -> None:
        self.steps, self.seconds = (None, None) if every is None else parse_checkpoint_every(every)
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether a step checkpoint is due after optimizer step ``step`` (numbered from 1)."""
        if self.steps is not None:
            return step % self.steps == 0
        return self.seconds is not None and time.monotonic() - self._last >= self.seconds

    def saved(self) -> None:
        self._last = time.monotonic()


def _step_of(path: Path) -> int:
    return int(_STEP_FILE.fullmatch(path.name)[1])


def checkpoint_state(trainer: Trainer) -> dict[str, Any]:
    """Everything :func:`restore` needs to continue ``trainer`` where it stands."""
    counters = dataclasses.replace(
        trainer.counters,
        wall_time=trainer.wall_time,
        skipped_images=trainer.train_source.skipped,
        **trainer.metrics.state_dict(),
    )
    step_evals = trainer.step_evals
    return {
        "format": FORMAT,
        "config": trainer.config.to_dict(),
        "learner": trainer.learner.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "score_table": trainer.score_table.state_dict(),
        "sampler": trainer.sampler.state_dict(),
        "sampler_policy": trainer.sampler.policy,
        "switch": trainer.switch.state_dict(),
        "counters": dataclasses.asdict(counters),
        "evaluations": trainer.evaluations,
        # --eval-steps: pending snapshots and results (absent from older checkpoints).
        "step_evals": None if step_evals is None else step_evals.state_dict(),
        "world_size": trainer.world,
        "feature_dim": trainer.learner.feature_dim,
        "channels": trainer.train_source.channels,
        "classes": trainer.train_source.classes,
        # The preset, data fingerprint and git sha of the run (absent from older checkpoints).
        "provenance": trainer.provenance,
    }


def restore(trainer: Trainer, state: dict[str, Any]) -> None:
    """Put the state of a checkpoint into a freshly built ``trainer`` of the same run."""
    saved = state["counters"]
    missing = [name for name in _COUNTER_NAMES if name not in saved]
    unknown = sorted(set(saved) - set(_COUNTER_NAMES))
    if missing or unknown:
        what = f"lacks counter {missing[0]}" if missing else f"has unknown counter {unknown[0]}"
        raise ValueError(f"--resume: the checkpoint in {trainer.run_dir} {what}")
    try:
        trainer.learner.load_state_dict(state["learner"])
    except RuntimeError as error:
        raise ValueError(
            f"--resume: the checkpoint's model does not match this run's model ({error})"
        ) from error
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.score_table.load_state_dict(state["score_table"])
    trainer.sampler = trainer.samplers[state["sampler_policy"]]
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.switch.load_state_dict(state["switch"])
    trainer.counters = Counters(**saved)
    trainer.train_source.skipped = trainer.counters.skipped_images
    trainer.evaluations = list(state["evaluations"])
    trainer.provenance = run_provenance(
        None, trainer.train_source.fingerprint, state.get("provenance") or trainer.provenance
    )
    if trainer.step_evals is not None and state.get("step_evals") is not None:
        trainer.step_evals.load_state_dict(state["step_evals"])
    # Drop metric lines written after the checkpoint: the resumed run rewrites them.
    trainer.metrics.load_state_dict({"metrics_lines": trainer.counters.metrics_lines})


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a kill, or a full disk, leaves the previous
    checkpoint as it was. A failed write raises OSError naming ``path``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno == errno.ENOSPC:
            reason = "no space left on the device"
        raise OSError(
            error.errno,
            f"cannot write the checkpoint {path}: {reason}; the previous checkpoint is kept",
        ) from error


def save_step_checkpoint(run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Write a step checkpoint (``step-NNNNNNNNN.pt``), make it ``last.pt`` and keep the
    newest ``keep`` step checkpoints; returns its path. Older ones are deleted only after the
    new one and ``last.pt`` are durable."""
    directory = Path(run_dir) / CHECKPOINTS
    path = directory / f"step-{int(state['counters']['global_step']):09d}.pt"
    save_checkpoint(path, state)
    last = directory / CHECKPOINT
    link = directory / f".{CHECKPOINT}.link.tmp"
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)  # no second copy of the bytes
    except OSError:  # a file system without hard links
        save_checkpoint(last, state)
    else:
        os.replace(link, last)
        fsync_dir(directory)
    for old in step_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def check_checkpoint_config(state: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """Refuse a checkpoint written under other settings than the run's ``config.json``.

    Keys renamed since the checkpoint was written (``selection`` -> ``policy``) are compared
    under their current names, and settings added since under the value the run had
    (:meth:`TrainConfig.upgrade_keys`), as ``config.json`` is read."""
    saved = TrainConfig.upgrade_keys(state.get("config", {}))
    current = config.to_dict()
    differ = sorted(
        key
        for key in set(saved) | set(current)
        if key not in RESUME_MAY_DIFFER and saved.get(key) != current.get(key)
    )
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} vs {current.get(k)!r}" for k in differ[:6])
        raise ValueError(
            f"--resume: the checkpoint in {run_dir} was written by a run with other settings "
            f"than {run_dir / 'config.json'} ({shown}); it comes from another run or preset, "
            "so it is not loaded"
        )


def load_checkpoint(
    path: str | os.PathLike[str], parts: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Read a checkpoint written by :class:`~rela_train.engine.Trainer` (a file, or a run
    directory). With ``parts`` (e.g. ``("learner",)``), a tool that reads only those gets
    them, checked to be there, from any file holding them; otherwise the whole checkpoint is
    checked (its format marker and every key).

    Loaded with ``weights_only=True``: a checkpoint holds only tensors, plain containers and
    primitive values, so a crafted file cannot run code here; anything else is refused."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = load_weights_only(
        path,
        refused=f"{path} is not a safe, valid rela-train checkpoint (damaged, or holding objects "
        "other than tensors and plain values); refused without running any of it",
        invalid=lambda error: f"{path} is not a valid rela-train checkpoint ({error})",
    )
    if parts is not None:
        missing = [part for part in parts if not isinstance(state, dict) or part not in state]
        if missing:
            raise ValueError(f"{path}: not a rela-train checkpoint with {', '.join(missing)}")
        return {part: state[part] for part in parts}
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a valid rela-train checkpoint (no {FORMAT} marker)")
    missing = sorted(_CHECKPOINT_KEYS - set(state))
    if missing or not isinstance(state.get("config"), dict):
        what = ", ".join(missing) or "config"
        raise ValueError(f"{path} is not a valid rela-train checkpoint (missing {what})")
    return state


def adapt_to_world(
    config: TrainConfig,
    state: dict[str, Any],
    world: int,
    run_dir: Path,
    log: Callable[[str], None],
) -> TrainConfig:
    """The resumed run's config on ``world`` ranks: the same global batch (and so the same
    learning rate, steps and data order), reached by another accumulation or per-rank batch;
    a world size that cannot reach it is refused with the reason."""
    old_world = int(state.get("world_size", 1))
    if old_world == world:
        return config
    batch, accum = config.batch_size, accumulation_steps(config, old_world)
    if (accum * old_world) % world == 0:
        changes = {"accum_steps": accum * old_world // world}
    elif config.policy != "inbatch" and (batch * old_world) % world == 0:
        changes = {"batch_size": batch * old_world // world}
    else:
        raise ValueError(
            f"--resume: the checkpoint in {run_dir} was trained on {old_world} ranks "
            f"with {batch} images x {accum} micro-batches per rank per step (global batch "
            f"{batch * accum * old_world}); on {world} ranks no whole per-rank batch "
            "or accumulation gives the same global batch; resume on a world size that "
            f"divides {accum * old_world} (or {batch * old_world} images)"
        )
    if config.global_batch is not None:
        changes.pop("accum_steps", None)  # derived from the global batch
    adapted = config.replace(**changes)
    log(
        f"resuming a {old_world}-rank checkpoint on {world} ranks: per rank "
        f"{adapted.batch_size} images x {accumulation_steps(adapted, world)} micro-batches "
        f"(global batch {batch * accum * old_world}, unchanged)"
    )
    return adapted


@dataclass
class Resumed:
    """A run about to continue: its config (adapted to the world size), the checkpoint's state
    and the file it came from."""

    config: TrainConfig
    state: dict[str, Any]
    path: Path


def load_run_config(run_dir: Path, overrides: Mapping[str, Any]) -> TrainConfig:
    """The config of the run in ``run_dir`` (its ``config.json``) with ``overrides`` applied.

    Only the settings that cannot change the results (:data:`RESUME_SETTINGS`) are taken from
    ``overrides``; any other setting it holds must equal the run's, or the resume is refused
    with the differing settings named (``fit --resume auto`` passes the whole command's
    config, so that a requeue with another command is not silently trained as the old run)."""
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"--resume: {run_dir} is not a run directory (no config.json)")
    saved = TrainConfig.load(run_dir / "config.json")
    if overrides.get("switch_transition") is not None:  # config.json holds the concrete one
        wanted = TrainConfig(**{**saved.to_dict(), **overrides}).concrete_transition
        overrides = {**overrides, "switch_transition": wanted}
    old = saved.to_dict()
    differ = sorted(
        name
        for name, value in overrides.items()
        if name not in RESUME_MAY_DIFFER and old.get(name) != value
    )
    if differ:
        shown = ", ".join(f"--{n.replace('_', '-')}: {old.get(n)!r} vs {overrides[n]!r}"
                          for n in differ[:6])  # fmt: skip
        raise ValueError(
            f"--resume: {run_dir} holds a run with other settings than the ones given "
            f"(run's vs given: {shown}); give the run's settings, or choose another --out"
        )
    return saved.replace(**{n: overrides[n] for n in RESUME_SETTINGS if n in overrides})


def resume(
    run_dir: str | os.PathLike[str],
    overrides: Mapping[str, Any],
    world: int,
    log: Callable[[str], None],
) -> Resumed:
    """Everything needed to continue the run in ``run_dir`` on ``world`` ranks: the config
    (:func:`load_run_config`), the newest checkpoint that can be read (a damaged one is
    reported and the next older step checkpoint used), checked against the config and adapted
    to ``world`` (:func:`adapt_to_world`)."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir, overrides)
    candidates = [checkpoint_path(run_dir), *step_checkpoints(run_dir)]
    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS}")
    errors = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            break
        except ValueError as error:
            errors.append(str(error))
    else:
        raise ValueError(f"--resume: no readable checkpoint in {run_dir}: {errors[0]}")
    for error in errors:
        log(f"warning: {error}; resuming from {path} instead")
    # A kill between writing a step checkpoint and linking it as last.pt leaves it newer.
    step = int(state["counters"]["global_step"])
    for newer in [p for p in step_checkpoints(run_dir) if _step_of(p) > step]:
        try:
            state, path = load_checkpoint(newer), newer
            break
        except ValueError as error:
            log(f"warning: {error}; resuming from {path} instead")
    check_checkpoint_config(state, config, run_dir)
    config = adapt_to_world(config, state, world, run_dir, log)
    return Resumed(config, state, path)


def write_checkpoint(trainer: Trainer, *, step: bool = False) -> Path:
    """Flush the trainer's pending scores and write its checkpoint (``step``: a step
    checkpoint); a collective. Rank 0 writes it; when it cannot, every rank raises (rank 0 with
    the error naming the path)."""
    trainer.pending_scores.flush()
    path, error = checkpoint_path(trainer.run_dir), None
    if trainer.main:
        try:
            state = checkpoint_state(trainer)
            if step:
                path = save_step_checkpoint(trainer.run_dir, state, trainer.config.keep_checkpoints)
            else:
                save_checkpoint(path, state)
        except OSError as caught:
            error = caught
    (ok,) = agree_min(trainer.dist, [int(error is None)])
    if error is not None:
        raise error
    if not ok:
        raise OSError(f"rank 0 could not write the checkpoint in {path.parent}; see its log")
    trainer.checkpoint_clock.saved()
    return path
