"""``rela-train report``: runs side by side, and accuracy against samples seen and wall time.

Reads each run directory's ``summary.json`` (and, for unfinished runs, the per-epoch records of
``metrics.jsonl``); prints one table and writes one PNG with two panels (kNN accuracy against
training samples seen, and against training wall time).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Run", "format_table", "load_run", "plot_runs"]


@dataclass
class Run:
    path: Path
    label: str
    summary: dict[str, Any] | None
    curve: list[dict[str, Any]] = field(
        default_factory=list
    )  # epoch, samples_seen, train_time, knn_acc


def _label(config: dict[str, Any]) -> str:
    rela = bool(config.get("prior") or config.get("prior_store"))
    method = "BYOL + ReLA" if rela else "BYOL"
    budget = config.get("budget", 1.0)
    if budget < 1.0:
        method += f" @{budget:.0%} ({config.get('policy', config.get('selection', 'random'))})"
    return method


def load_run(path: str | os.PathLike[str]) -> Run:
    """A run directory's summary (None if unfinished) and its accuracy curve."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no config.json)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    summary_path = path / "summary.json"
    summary = (
        json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    )
    if summary is not None:
        curve = list(summary.get("evaluations", []))
    else:
        curve = []
        metrics = path / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record.get("event") == "epoch" and "knn_acc" in record:
                    curve.append(record)
    return Run(path, _label(config), summary, curve)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def format_table(runs: list[Run]) -> str:
    """A plain-text table: method, kNN, linear probe, samples seen, training and total time."""
    header = ("run", "method", "kNN", "linear", "samples seen", "train s", "total s", "switch")
    rows = []
    for run in runs:
        s = run.summary
        if s is None:
            last = run.curve[-1] if run.curve else {}
            rows.append(
                (
                    run.path.name,
                    run.label + " (unfinished)",
                    _pct(last.get("knn_acc")),
                    "-",
                    str(last.get("samples_seen", "-")),
                    f"{last['train_time']:.0f}" if "train_time" in last else "-",
                    "-",
                    "-",
                )
            )
            continue
        switch = "-"
        if s.get("switch") is not None:
            switch = f"step {s['switch_step']}" if s.get("switch_step") is not None else "no switch"
        rows.append(
            (
                run.path.name,
                run.label,
                _pct(s.get("knn_acc")),
                _pct(s.get("linear_acc")),
                f"{s['samples_seen']:,}",
                f"{s['train_time']:.0f}",
                f"{s['wall_time']:.0f}",
                switch,
            )
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def plot_runs(runs: list[Run], out: str | os.PathLike[str]) -> Path:
    """Two panels: kNN accuracy against samples seen and against training wall time."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "--plot: writing a plot needs matplotlib, which is not installed (pip install "
            "matplotlib, or this package's [train] extra); --plot '' writes none"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for run in runs:
        if not run.curve:
            continue
        samples = [p["samples_seen"] for p in run.curve]
        seconds = [p["train_time"] for p in run.curve]
        accuracy = [100 * p["knn_acc"] for p in run.curve]
        left.plot(samples, accuracy, marker="o", label=run.label)
        right.plot(seconds, accuracy, marker="o", label=run.label)
    banks = {run.summary.get("eval_bank") for run in runs if run.summary is not None}
    if len(banks) == 1 and None not in banks:
        # Per-epoch points use a fixed bank subset (cheap); say so, as the table uses all images.
        figure.suptitle(
            f"kNN accuracy with a bank of {banks.pop():,} training images "
            "(the summary's kNN uses the whole training set)",
            fontsize=10,
        )
    left.set_xlabel("training samples seen")
    right.set_xlabel("training wall time (s)")
    for axis in (left, right):
        axis.set_ylabel("kNN top-1 accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
