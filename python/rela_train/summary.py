"""A finished run's ``summary.json``, its final ``metrics.jsonl`` record and its last log line."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import torch

from rela_kernels.atomic_io import atomic_write_text

if TYPE_CHECKING:  # the trainer imports this module, not the other way round
    from rela_train.engine import Trainer

__all__ = ["build_summary", "final_record", "start_line", "summary_line", "write_summary"]


def build_summary(trainer: Trainer, result: dict[str, Any], wall_time: float) -> dict[str, Any]:
    """What ``summary.json`` holds: the run's settings that matter for comparing runs, its
    counters, and the final evaluation ``result``."""
    config, counters = trainer.config, trainer.counters
    train, val = trainer.train_source, trainer.val_source
    rho = trainer.switch.rho
    return {
        "run_dir": str(trainer.run_dir),
        "method": "BYOL + ReLA" if config.rela else "BYOL",
        "dataset": train.name,
        "train_images": train.n,
        "val_images": val.n,
        "epochs": config.epochs,
        "steps": counters.global_step,
        "budget": config.budget,
        "policy": config.policy,
        "prior": config.prior or config.prior_store,
        "switch": config.switch if config.rela else None,
        "switch_step": counters.switch_step,
        "switch_epoch": counters.switch_epoch,
        "last_rho": None if math.isnan(rho) else rho,
        "samples_seen": counters.samples_seen,
        "samples_scored": counters.samples_scored,
        "train_time": counters.train_time,
        "wall_time": wall_time,
        "eval_time": result["eval_time"],
        "knn_acc": result["knn_acc"],
        "knn_acc_bank": result.get("knn_acc_bank"),
        "eval_bank": config.eval_bank,
        "linear_acc": result.get("linear_acc"),
        "probe": config.probe,
        "linear_acc_official": result.get("linear_acc_official"),
        "linear_acc_official_std": result.get("linear_acc_official_std"),
        "skipped_images": train.skipped,
        "skipped_files": sorted({*train.unreadable(), *val.unreadable()}),
        "evaluations": trainer.evaluations,
        "switch_transition": config.switch_transition if config.rela else None,
        "step_evaluations": [] if trainer.step_evals is None else trainer.step_evals.records,
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
    }


def final_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``final`` line of ``metrics.jsonl``: the summary less the evaluation list, with the
    step under ``step`` as in every other record."""
    record = {k: v for k, v in summary.items() if k not in ("evaluations", "steps")}
    return {"event": "final", "step": summary["steps"], **record}


def summary_line(summary: dict[str, Any]) -> str:
    linear = summary.get("linear_acc")
    if linear is None:
        linear = summary.get("linear_acc_official")
    shown = "n/a" if linear is None else f"{linear:.4f}"
    return (
        f"done: kNN {summary['knn_acc']:.4f}, linear probe {shown}, "
        f"{summary['samples_seen']} samples in {summary['train_time']:.0f} s of training "
        f"({summary['wall_time']:.0f} s in all)"
    )


def write_summary(trainer: Trainer, result: dict[str, Any]) -> dict[str, Any]:
    """Record the final evaluation ``result``: the last point of the evaluations (on the same
    bank as the others), the ``final`` metrics record and ``summary.json``. Returns the
    summary."""
    counters = trainer.counters
    trainer.evaluations.append(
        {
            "epoch": counters.epoch - 1,
            "samples_seen": counters.samples_seen,
            "train_time": counters.train_time,
            "knn_acc": result.get("knn_acc_bank", result["knn_acc"]),
        }
    )
    summary = build_summary(trainer, result, trainer.wall_time)
    trainer.metrics.write(final_record(summary))
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    atomic_write_text(trainer.run_dir / "summary.json", text)
    return summary


def start_line(trainer: Trainer) -> str:
    config, train = trainer.config, trainer.train_source
    what = "BYOL + ReLA" if config.rela else "BYOL"
    return (
        f"{what}: {train.name} ({train.n} images), budget {config.budget:g} ({config.policy}), "
        f"{config.epochs} epochs x {trainer.steps_per_epoch} steps, {config.arch} width "
        f"{config.width}, device {trainer.device}, {torch.get_num_threads()} threads"
    )
