"""Library entry points of a training run: :func:`fit` (what the ``fit`` command does) and the
default run directory name. Evaluating a checkpoint is in :mod:`rela_train.evaluate`."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rela_train.config import TrainConfig
from rela_train.engine import Hooks, RunResult, Trainer
from rela_train.stop import StartupStopped

__all__ = ["default_run_dir", "fit"]


def fit(
    config: TrainConfig,
    out: str | os.PathLike[str],
    *,
    resume: bool | str = False,
    hooks: Hooks | None = None,
    log: Callable[[str], None] | None = None,
    preset: str | None = None,
) -> RunResult:
    """Train (or, with ``resume=True``, continue) the run in directory ``out``;
    ``resume="auto"`` continues it when it holds a checkpoint and starts it otherwise.

    Returns a :class:`RunResult` whose ``status`` is ``finished`` (``summary.json`` written) or
    ``interrupted`` (SIGUSR1/SIGTERM/SIGINT or :meth:`Trainer.request_stop`; a checkpoint was
    written; or SIGUSR1/SIGTERM while the run was starting: no checkpoint, the prior's
    embeddings kept).
    ``preset``: the name of the preset ``config`` started from, kept in the checkpoints'
    provenance (a resumed run keeps its own).
    """
    try:
        trainer = Trainer(config, out, resume=resume, hooks=hooks, log=log, preset=preset)
    except StartupStopped as stopped:
        prior = Path(out) / "prior"
        kept = f"; the prior's finished chunks are kept in {prior}" if prior.is_dir() else ""
        (log or _stderr)(
            f"{stopped} while the run was starting{kept}. Run the same command again "
            "(--resume auto) to continue"
        )
        return RunResult("interrupted", Path(out), signal=stopped.signum)
    return trainer.run()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """``runs/<dataset>-<byol|rela>-b<budget>-<policy>-<timestamp>``."""
    method = "rela" if config.rela else "byol"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.dataset}-{method}-b{config.budget:g}-{config.policy}-{stamp}"
