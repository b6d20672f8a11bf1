"""Library entry points of a training run: :func:`fit` (what the ``fit`` command does) and the
default run directory name. Evaluating a checkpoint is in :mod:`rela_train.evaluate`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rela_train.config import TrainConfig
from rela_train.engine import RunResult, Trainer

__all__ = ["default_run_dir", "fit"]


def fit(config: TrainConfig, out: str | os.PathLike[str], **options: Any) -> RunResult:
    """Train (or, with ``resume=True``, continue) the run in directory ``out``; ``options`` are
    :class:`Trainer`'s (``resume``, ``hooks``, ``log``).

    Returns a :class:`RunResult` whose ``status`` is ``finished`` (``summary.json`` written) or
    ``interrupted`` (SIGTERM/SIGINT or :meth:`Trainer.request_stop`; a checkpoint was written).
    """
    return Trainer(config, out, **options).run()


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """``runs/<dataset>-<byol|rela>-b<budget>-<policy>-<timestamp>``."""
    method = "rela" if config.rela else "byol"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.dataset}-{method}-b{config.budget:g}-{config.policy}-{stamp}"
