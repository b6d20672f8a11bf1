"""A run's checkpoint: what it holds, writing and reading it, restoring a trainer from it, and
resuming it on another world size.

A checkpoint holds everything of a run that evolves (weights, optimizer, score table, the current
epoch's subset, the switch state, the :class:`Counters`, the evaluations so far) plus the config
it was written under; with the fixed seeds that is enough to replay the remaining steps bit for
bit. Files are read with ``weights_only=True``: a checkpoint never runs code.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rela_kernels.atomic_io import atomic_write, atomic_write_text
from rela_train.build import accumulation_steps, epoch_steps
from rela_train.config import RESUME_SETTINGS, TrainConfig
from rela_train.provenance import run_provenance

if TYPE_CHECKING:  # the trainer imports this module, not the other way round
    from rela_train.engine import Trainer

__all__ = [
    "CHECKPOINT",
    "FORMAT",
    "RESUME_MAY_DIFFER",
    "Counters",
    "adapt_to_world",
    "check_checkpoint_config",
    "checkpoint_state",
    "load_checkpoint",
    "restore",
    "save_checkpoint",
]

CHECKPOINT = "last.pt"
FORMAT = "rela-train-checkpoint-v1"
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
    metrics_lines: int = 0
    # Unreadable training images skipped so far (the training source keeps the live count).
    skipped_images: int = 0


_COUNTER_NAMES = tuple(f.name for f in dataclasses.fields(Counters))

# Settings a resumed run may have changed since its checkpoint: the output only, or adapted to a
# new world size (see adapt_to_world).
RESUME_MAY_DIFFER = {*RESUME_SETTINGS, "batch_size", "accum_steps"}


def checkpoint_state(trainer: Trainer) -> dict[str, Any]:
    """Everything :func:`restore` needs to continue ``trainer`` where it stands."""
    counters = dataclasses.replace(
        trainer.counters,
        wall_time=trainer.wall_time,
        skipped_images=trainer.train_source.skipped,
    )
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
        "step_evals": None if trainer.step_evals is None else trainer.step_evals.state_dict(),
        "world_size": trainer.world,
        "feature_dim": trainer.learner.feature_dim,
        "channels": trainer.train_source.channels,
        "classes": trainer.train_source.classes,
        # The preset, data fingerprint and git sha of the run (absent from older checkpoints).
        "provenance": trainer.provenance,
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a kill leaves the previous checkpoint)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))


def restore(trainer: Trainer, state: dict[str, Any]) -> None:
    """Put the state of a checkpoint into a freshly built ``trainer`` of the same run."""
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
    # An annealed epoch (--anneal) takes more steps than a pruned one.
    trainer.steps_per_epoch = epoch_steps(
        trainer.sampler, trainer.sampler.epoch, trainer.step_images
    )
    trainer.switch.load_state_dict(state["switch"])
    saved = state["counters"]
    missing = [name for name in _COUNTER_NAMES if name not in saved]
    unknown = sorted(set(saved) - set(_COUNTER_NAMES))
    if missing or unknown:
        what = f"lacks counter {missing[0]}" if missing else f"has unknown counter {unknown[0]}"
        raise ValueError(f"--resume: the checkpoint in {trainer.run_dir} {what}")
    trainer.counters = Counters(**saved)
    trainer.train_source.skipped = trainer.counters.skipped_images
    trainer.evaluations = list(state["evaluations"])
    trainer.provenance = run_provenance(
        None, trainer.train_source.fingerprint, state.get("provenance") or trainer.provenance
    )
    if trainer.step_evals is not None and state.get("step_evals") is not None:
        trainer.step_evals.load_state_dict(state["step_evals"])
    # Drop metric lines written after the checkpoint: the resumed run rewrites them.
    metrics = trainer.run_dir / "metrics.jsonl"
    if trainer.main and metrics.exists():
        lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
        atomic_write_text(metrics, "".join(lines[: trainer.counters.metrics_lines]))


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


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :class:`~rela_train.engine.Trainer` (a file, or a run
    directory).

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
        # torch's own message suggests turning the weights-only guard off, which would run the
        # file's code: it is not passed on.
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
