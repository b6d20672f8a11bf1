"""A lock file that names its holder, and the directories a writer creates for it.

The holder takes an exclusive ``flock`` on the file and writes a record of itself into it (pid,
host, start time, plus what the caller adds), so that a second writer is refused with the holder
named. The kernel releases the lock when the holder exits, SIGKILL included, so a killed writer
never blocks its own resume; the file stays behind. Run directories (``rela_train``) and embedding
stores (:mod:`rela_kernels.store_lock`) both hold one.
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
except ImportError:  # Windows: no flock; writers need a POSIX system (Linux, macOS)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "HolderLock",
    "LockHeld",
    "describe_holder",
    "make_directory",
    "read_holder",
    "remove_created",
]


class LockHeld(BlockingIOError):
    """Another process holds the lock; ``holder`` describes it (pid, host, start time)."""

    def __init__(self, code: int, holder: str) -> None:
        super().__init__(code, f"the lock is held ({holder})")
        self.holder = holder


def read_holder(file: Path) -> dict[str, Any] | None:
    """The record the current (or last) holder of ``file`` wrote, or None if unreadable."""
    try:
        holder = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: Mapping[str, Any] | None) -> str:
    """``pid P on HOST, started TIME``, or ``holder unknown``."""
    if not holder or not {"pid", "host", "started"} <= holder.keys():
        return "holder unknown"
    return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"


class HolderLock:
    """An exclusive ``flock`` on ``file`` with this process recorded in it: :meth:`take` it,
    :meth:`release` it, or :meth:`restore` the record it replaced when the start failed."""

    def __init__(self, file: Path, fd: int, previous: bytes | None) -> None:
        self.file = file
        self.fd: int | None = fd
        self.made_file = previous is None  # whether this take created the file
        self._previous = previous or b""  # the record this take replaced

    @classmethod
    def take(cls, file: Path, **record: Any) -> HolderLock:
        """Lock ``file`` (created if missing) without waiting and record the holder (pid, host,
        start time and ``record``), durably; raises :class:`LockHeld` naming the holder."""
        if fcntl is None:
            raise OSError(errno.ENOSYS, f"locking {file} needs a POSIX system")
        previous = file.read_bytes() if file.exists() else None
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise LockHeld(error.errno, describe_holder(read_holder(file))) from error
            raise
        held = cls(file, fd, previous)
        try:
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **record,
            }
            held._write((json.dumps(holder) + "\n").encode("utf-8"))
        except BaseException:
            held.release()
            raise
        return held

    def _write(self, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        # Durable before anyone is told to look: processes on other nodes may read the record.
        os.fsync(self.fd)

    def release(self) -> None:
        """Unlock (the file stays, with the record)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None

    def restore(self) -> None:
        """The start failed: put back the record :meth:`take` replaced (empty if it made the
        file), then unlock."""
        if self.fd is not None:
            try:
                self._write(self._previous)
            finally:
                self.release()


def make_directory(path: Path) -> Path | None:
    """Create ``path`` with its parents; returns the topmost directory this made (None when
    ``path`` existed), which :func:`remove_created` takes back."""
    created = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        created = candidate
    path.mkdir(parents=True, exist_ok=True)
    return created


def remove_created(path: Path, created: Path | None) -> None:
    """Remove the empty directories from ``path`` up to ``created`` (what
    :func:`make_directory` made); a directory that is not empty stays, with its parents."""
    if created is None:
        return
    for directory in (path, *path.parents):
        try:
            directory.rmdir()
        except OSError:
            break
        if directory == created:
            break
