"""Library entry points: ``fit`` a run, ``evaluate_checkpoint`` a finished or partial one."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rela_train.config import PROBES, TrainConfig
from rela_train.data.sources import build_sources
from rela_train.engine import Hooks, RunResult, Trainer, build_learner, load_checkpoint
from rela_train.evaluate import extract_features, final_probe_results, knn_accuracy
from rela_train.runtime import resolve_device

__all__ = ["evaluate_checkpoint", "fit"]


def fit(
    config: TrainConfig,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    hooks: Hooks | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Train (or, with ``resume=True``, continue) the run in directory ``out``.

    Returns a :class:`RunResult` whose ``status`` is ``finished`` (``summary.json`` written) or
    ``interrupted`` (SIGTERM/SIGINT or :meth:`Trainer.request_stop`; a checkpoint was written).
    """
    return Trainer(config, out, resume=resume, hooks=hooks, log=log).fit()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    data_dir: str | None = None,
    val_dir: str | None = None,
    probe_iterations: int | None = None,
    threads: int | None = None,
    probe: str | None = None,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """kNN and linear-probe accuracy of a checkpoint's backbone (a file or a run directory).

    The data come from the checkpoint's configuration; ``data_dir`` / ``val_dir`` point it at
    another copy of the same data. ``probe`` (``lbfgs``, ``official``, ``none``; default: the
    run's ``--probe``) chooses the linear probe; ``probe_iterations`` its L-BFGS iterations or
    official epochs (default: the run's ``--probe-epochs``).
    """
    if probe is not None and probe not in PROBES:
        raise ValueError(f"--probe: expected one of {', '.join(PROBES)}, got {probe!r}")
    for name, value, least in (("probe_iterations", probe_iterations, 0), ("threads", threads, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer, got {value!r}")
        if value is not None and value < least:
            raise ValueError(
                f"--{name.replace('_', '-')}: expected an integer >= {least}, got {value}"
            )
    state = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(state["config"])
    except ValueError as error:
        raise ValueError(f"{path}: the checkpoint's configuration is not valid: {error}") from error
    changes: dict[str, Any] = {}
    if data_dir is not None:
        changes["data_dir"] = data_dir
    if val_dir is not None:
        changes["val_dir"] = val_dir
    if changes:
        config = config.replace(**changes)
    if threads is not None:
        torch.set_num_threads(threads)
    elif config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        dev = resolve_device(device)
    except ValueError as error:
        raise ValueError(f"--device: {error}") from error
    start = time.perf_counter()
    train, val = build_sources(config, warn=log)
    head = state["learner"].get("rela_head.weight")
    learner = build_learner(
        config, state["channels"], len(state["classes"]), None if head is None else head.shape[0]
    )
    learner.load_state_dict(state["learner"])
    backbone = learner.byol.backbone.to(dev).eval()
    autocast = dev.type == "cuda" and config.amp != "off"
    train_f, train_y = extract_features(
        backbone, train, size=config.image_size, device=dev, autocast=autocast
    )
    val_f, val_y = extract_features(
        backbone, val, size=config.image_size, device=dev, autocast=autocast
    )
    classes = len(state["classes"])
    knn = knn_accuracy(
        train_f, train_y, val_f, val_y, k=config.knn_k, temperature=config.knn_t,
        num_classes=classes,
    )  # fmt: skip
    iterations = config.probe_epochs if probe_iterations is None else probe_iterations
    probe = config.probe if probe is None else probe
    probes = final_probe_results(probe, train_f, train_y, val_f, val_y, classes, iterations)
    counters = state["counters"]
    return {
        "checkpoint": str(path),
        "epoch": counters["epoch"],
        "step": counters["global_step"],
        "samples_seen": counters["samples_seen"],
        "knn_acc": knn,
        "linear_acc": probes.get("linear_acc"),
        "probe": probe,
        **{k: v for k, v in probes.items() if k != "linear_acc"},
        "train_images": train.n,
        "val_images": val.n,
        "skipped_files": sorted({*train.unreadable(), *val.unreadable()}),
        "eval_time": time.perf_counter() - start,
    }


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """``runs/<dataset>-<byol|rela>-b<budget>-<selection>-<timestamp>``."""
    method = "rela" if config.rela else "byol"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.dataset}-{method}-b{config.budget:g}-{config.selection}-{stamp}"
