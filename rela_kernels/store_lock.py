"""The locks of an EmbeddingStore directory: who writes it, and who may.

``.lock``: the store's leader holds an exclusive ``flock`` on it and records itself in it (pid,
host, start time, and the token of its distributed job, if any), so that a second writer is
refused with the holder named and the leader's other processes can check they see the same
directory. ``.writers``: every process that joined a leader holds a shared ``flock`` on it while it
may write; a new leader refuses the store while any does. The kernel releases both on any exit,
SIGKILL included, so a killed job never blocks its own resume.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from rela_kernels.holder_lock import HolderLock, LockHeld, read_holder

try:
    import fcntl
except ImportError:  # Windows: no flock; the store needs a POSIX system (Linux, macOS)
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK", "WRITERS", "check_no_writers", "holder_job", "take_lock", "take_writer_lock"]

LOCK = ".lock"
WRITERS = ".writers"  # shared flock of the non-leader writers of a job
_WHERE = "rk.EmbeddingStore"


def holder_job(path: Path) -> str | None:
    """The job token the current (or last) leader of the store at ``path`` recorded."""
    holder = read_holder(path / LOCK)
    job = holder.get("job") if holder else None
    return job if isinstance(job, str) else None


def take_lock(path: Path, job: str | None) -> HolderLock:
    """The leader's exclusive lock on ``.lock`` (held until released), with this process and
    ``job`` recorded in it; BlockingIOError naming the holder if it is taken."""
    try:
        return HolderLock.take(path / LOCK, job=job)
    except LockHeld as error:
        raise BlockingIOError(
            error.errno,
            f"{_WHERE}: another process is writing the store at {path} ({error.holder}); "
            "wait for it to end, or write another directory",
        ) from error


def check_no_writers(path: Path) -> None:
    """Refuse the store while processes that joined an earlier job's leader still write."""
    if not (path / WRITERS).exists():
        return
    fd = os.open(path / WRITERS, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise BlockingIOError(
                error.errno,
                f"{_WHERE}: processes of an earlier job still write the store at {path} "
                f"(they hold {WRITERS}); they stop once they notice that their leader is "
                "gone (--dist-timeout): end them or wait, then rerun",
            ) from error
        raise
    finally:
        os.close(fd)  # the check only: closing releases the lock


def take_writer_lock(path: Path) -> int:
    """A joined writer's shared lock on ``.writers`` (held until the returned fd is closed)."""
    if fcntl is None:
        raise OSError(errno.ENOSYS, f"{_WHERE}: writing a store needs a POSIX system")
    fd = os.open(path / WRITERS, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd
