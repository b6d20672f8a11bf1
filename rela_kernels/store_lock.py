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
import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; the store needs a POSIX system (Linux, macOS)
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK", "WRITERS", "check_no_writers", "holder_job", "take_lock", "take_writer_lock"]

LOCK = ".lock"
WRITERS = ".writers"  # shared flock of the non-leader writers of a job
_WHERE = "rk.EmbeddingStore"


def _holder(job: str | None) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "job": job,
    }


def _read_holder_file(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads((path / LOCK).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe_holder(holder: Mapping[str, Any] | None) -> str:
    if not holder or not {"pid", "host", "started"} <= holder.keys():
        return "holder unknown"
    return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"


def holder_job(path: Path) -> str | None:
    """The job token the current (or last) leader of the store at ``path`` recorded."""
    holder = _read_holder_file(path)
    job = holder.get("job") if holder else None
    return job if isinstance(job, str) else None


def take_lock(path: Path, job: str | None) -> int:
    """The leader's exclusive lock on ``.lock`` (held until the returned fd is closed), with this
    process and ``job`` recorded in it; BlockingIOError naming the holder if it is taken."""
    if fcntl is None:
        raise OSError(errno.ENOSYS, f"{_WHERE}: writing a store needs a POSIX system")
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
    try:
        # Released by the kernel when the holder exits, even on SIGKILL, so a killed run
        # never blocks its own resume.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
            holder = _describe_holder(_read_holder_file(path))
            raise BlockingIOError(
                error.errno,
                f"{_WHERE}: another process is writing the store at {path} ({holder}); "
                "wait for it to end, or write another directory",
            ) from error
        raise
    try:
        text = (json.dumps(_holder(job)) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        # Durable before anyone is told to look: processes on other nodes read the token.
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
