"""TensorBoard scalars of a run (``rela-train fit --tensorboard [DIR]``), written on rank 0.

Every record the trainer writes to ``metrics.jsonl`` also goes here, as scalars at the record's
global step: per step the loss, phase (0 = ReLA, 1 = BYOL), rho, learning rate, tau, images/s and
samples seen (and the online probe's loss and accuracy); per evaluation kNN and the probe
accuracies. Every point of ``eval/knn_acc`` is measured on the same evaluation bank
(``--eval-bank``); the final kNN on the whole training set is ``eval/knn_acc_full``.
``metrics.jsonl`` stays the record of the run; this is a view of it.

TensorBoard is optional (``pip install 'rela-kernels[tensorboard]'``): :func:`check_tensorboard`
refuses the flag with one line when the package is missing or the directory cannot be written,
before the run creates anything. A resumed run replays the steps after its checkpoint; the
writer then opens with ``purge_step`` = the checkpoint's step + 1, so TensorBoard's readers drop
what a killed process wrote past the checkpoint and each step appears once.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = [
    "EVAL_TAGS",
    "FINAL_FULL_KNN_TAG",
    "STEP_TAGS",
    "TensorBoardLog",
    "check_tensorboard",
    "scalars_of",
    "tensorboard_dir",
]

PHASES = {"rela": 0.0, "byol": 1.0}
# metrics.jsonl key -> TensorBoard tag, for step records and for evaluation records.
STEP_TAGS = {
    "loss": "train/loss",
    "phase": "train/phase",
    "rho": "train/rho",
    "lr": "train/lr",
    "tau": "train/tau",
    "img_per_s": "train/images_per_s",
    "samples_seen": "train/samples_seen",
    "probe_loss": "train/probe_loss",
    "probe_acc": "train/probe_acc",
}
EVAL_TAGS = {
    "knn_acc": "eval/knn_acc",
    "linear_acc": "eval/linear_acc",
    "linear_acc_official": "eval/linear_acc_official",
    "linear_acc_official_std": "eval/linear_acc_official_std",
}
# The final record's kNN on the whole training set (its `knn_acc`); the curve's last point
# `eval/knn_acc` is measured like the others, on the evaluation bank (its `knn_acc_bank`).
FINAL_FULL_KNN_TAG = "eval/knn_acc_full"
_INSTALL = "pip install 'rela-kernels[tensorboard]'"


def tensorboard_dir(value: str, run_dir: str | os.PathLike[str]) -> Path:
    """The directory ``--tensorboard VALUE`` names: relative paths are taken inside the run
    directory, so a resumed run writes where it started from whatever the working directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(run_dir) / path


def check_tensorboard(directory: Path, *, new: bool) -> None:
    """Raise ValueError (one line naming the flag) when the tensorboard package is missing,
    ``directory`` cannot be created or written, or (``new`` run) it already holds events: the
    curves of two runs would mix. Creates nothing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError as error:
        raise ValueError(
            f"--tensorboard: the tensorboard package is not installed ({error}); install it "
            f"with {_INSTALL}"
        ) from error
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"--tensorboard: cannot write to {directory}: {existing} exists and is not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--tensorboard: cannot write to {directory}: {existing} is not writable")
    if new and directory.is_dir():
        if any(p.name.startswith("events.out.tfevents") for p in directory.iterdir()):
            raise ValueError(
                f"--tensorboard: {directory} already holds the events of another run; choose an "
                "empty directory"
            )


def scalars_of(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """``(global step, {tag: value})`` of one ``metrics.jsonl`` record; values that are unset
    (rho before the switch rule has one, probes not run) or not finite are left out."""
    event = record.get("event")
    step = int(record["step"])
    if event is None:
        tags = STEP_TAGS
    else:  # an evaluation, epoch or final record: only its evaluation results
        tags = EVAL_TAGS
    if event == "final":
        bank = record.get("knn_acc_bank")
        record = {
            **record,
            "knn_acc": record.get("knn_acc") if bank is None else bank,
            "knn_acc_full": record.get("knn_acc"),
        }
        tags = {**EVAL_TAGS, "knn_acc_full": FINAL_FULL_KNN_TAG}
    scalars: dict[str, float] = {}
    for key, tag in tags.items():
        value = record.get(key)
        if key == "phase" and value is not None:
            value = PHASES[value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                scalars[tag] = float(value)
    return step, scalars


class TensorBoardLog:
    """A ``SummaryWriter`` fed with the run's metrics records."""

    def __init__(self, directory: Path, *, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        try:
            self._writer = SummaryWriter(log_dir=str(directory), purge_step=purge)
        except OSError as error:
            raise ValueError(f"--tensorboard: cannot write to {directory}: {error}") from error

    def write(self, record: dict[str, Any]) -> None:
        step, scalars = scalars_of(record)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.close()
