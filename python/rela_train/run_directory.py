"""Ownership of a run directory: one writer at a time, and no foreign files overwritten.

While a run writes its directory, rank 0 holds an exclusive ``flock`` on ``rela-train.lock`` in
it; the file records the holder (pid, host, start time) so that a second writer is refused with
a message naming it. The kernel releases the lock when the holder exits, even on SIGKILL, so a
killed run never blocks its own resume. The lock file stays behind and marks the directory as
rela-train's: a new run (not a resume) refuses a directory holding the files a run writes
(``config.json``, ``metrics.jsonl``, ...) without that mark, since they belong to something else.

A start that fails before training removes what it created (the directory, if it made it),
except an embedding store of the prior in it, which is resumable work.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rela_kernels.holder_lock import HolderLock, LockHeld, make_directory

__all__ = ["CHECKPOINT", "CHECKPOINTS", "LOCK", "RUN_FILES", "RunDirectory", "checkpoint_path"]

LOCK = "rela-train.lock"
CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints
CHECKPOINT = "last.pt"  # the newest of them
# What a run writes into its directory (a new run replaces these, so they must be its own).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", CHECKPOINTS, "prior")


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """The newest checkpoint of the run in ``run_dir`` (it may not exist yet)."""
    return Path(run_dir) / CHECKPOINTS / CHECKPOINT


class RunDirectory:
    """The run directory held by this process: :meth:`open` it, :meth:`release` it at the end,
    or :meth:`abandon` it when the start failed."""

    def __init__(self, path: Path, lock: HolderLock, created: Path | None) -> None:
        self.path = path
        self._lock = lock
        self._created = created  # the topmost directory this start made, if it made one

    @classmethod
    def check_new(cls, path: Path) -> None:
        """Refuse a directory that holds a run already or files rela-train did not write;
        creates nothing (called before anything else of a new run)."""
        if checkpoint_path(path).exists():
            raise ValueError(
                f"--out: {path} already holds a run; continue it with --resume, or choose "
                "another --out"
            )
        if not path.is_dir():
            if path.exists():
                raise ValueError(f"--out: {path} exists and is not a directory")
            return
        if (path / LOCK).is_file():
            return  # an earlier start of a run here that never reached its first checkpoint
        foreign = [name for name in RUN_FILES if (path / name).exists()]
        if foreign:
            raise ValueError(
                f"--out: {path} holds {', '.join(foreign)} that rela-train did not write there "
                "(no rela-train.lock); it is not overwritten: choose a new or empty directory"
            )

    @classmethod
    def open(cls, path: Path, *, new: bool) -> RunDirectory:
        """Create (``new`` runs) and lock ``path``; raises ValueError if another process holds
        it, or (``new``) if it holds a run or foreign files."""
        if new:
            cls.check_new(path)
        created = make_directory(path)
        try:
            lock = HolderLock.take(path / LOCK)
        except LockHeld as error:
            raise ValueError(
                f"--out: {path} is being written by another rela-train run ({error.holder}); "
                "wait for it to end or choose another directory"
            ) from error
        held = cls(path, lock, created)
        if new:
            try:
                cls.check_new(path)  # again, now that no other start can race this one
            except BaseException:
                held.release()  # what is there now is another start's: left as it is
                raise
        return held

    def release(self) -> None:
        """Unlock (the lock file stays: it marks the directory as a rela-train run's)."""
        self._lock.release()

    def abandon(self) -> None:
        """The start failed: remove what it created, then unlock. A directory this start did not
        create is left as it was, and so is one holding the prior's (resumable) embeddings."""
        try:
            prior = self.path / "prior"
            if self._lock.fd is not None and not (prior.is_dir() and any(prior.iterdir())):
                if self._created is not None:
                    shutil.rmtree(self._created, ignore_errors=True)
                elif self._lock.made_file:
                    self._lock.file.unlink(missing_ok=True)
        finally:
            self.release()

    def __del__(self) -> None:
        self.release()
