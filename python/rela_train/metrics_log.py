"""A run's metrics records: ``metrics.jsonl`` (the record of the run) and, with
``--tensorboard``, the same values as TensorBoard scalars.

Every rank counts the records (the count is part of the checkpoint: :meth:`MetricsLog.state_dict`);
only rank 0 writes them. A resumed run first drops the lines written after its checkpoint
(:meth:`MetricsLog.load_state_dict`), then replays them: the file ends as an uninterrupted run's.
TensorBoard's writer opens with ``purge_step`` at the checkpoint's step for the same reason
(:mod:`rela_train.tensorboard_log`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rela_kernels.atomic_io import atomic_write_text
from rela_train.tensorboard_log import TensorBoardLog

__all__ = ["METRICS", "MetricsLog"]

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` (rank 0) and to TensorBoard when opened."""

    def __init__(self, run_dir: Path, *, main: bool) -> None:
        self.path = run_dir / METRICS
        self.main = main
        self.lines = 0  # records written so far, over all of the run's processes
        self._tensorboard: TensorBoardLog | None = None

    def start(self, *, tensorboard: Path | None, resume_step: int | None) -> None:
        """Open the log: a new run (``resume_step`` None) starts an empty file; a resumed one
        keeps what :meth:`load_state_dict` left. ``tensorboard``: the events directory."""
        if not self.main:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        if tensorboard is not None:
            # After a resume the steps past the checkpoint are replayed: purged, not doubled.
            self._tensorboard = TensorBoardLog(tensorboard, resume_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        self.lines += 1
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tensorboard is not None:
            self._tensorboard.write(record)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def state_dict(self) -> dict[str, int]:
        return {"metrics_lines": self.lines}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the checkpoint's ``metrics_lines`` records: the lines a stopped or
        killed process wrote past them are dropped (the resumed run writes them again)."""
        self.lines = int(state["metrics_lines"])
        if self.main and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            atomic_write_text(self.path, "".join(lines[: self.lines]))
