"""Stopping a run: the signals that ask for it and the agreement of every rank on it.

SIGUSR1 (a cluster's preemption notice, e.g. SLURM's ``--signal=USR1@120``), SIGTERM and SIGINT
only set a flag. The training loop asks :meth:`StopController.should_stop` at each step
boundary; on ``True`` it writes a checkpoint and returns, and the ``fit`` command exits with
:data:`REQUEUE` (SIGUSR1, SIGTERM) so that a wrapper can run the same command again. Nothing is
written inside a handler: a handler can interrupt any line of the loop, including a checkpoint
being written. A second SIGINT raises ``KeyboardInterrupt`` (abort without a checkpoint).

Before the loop there is no step boundary to wait for: while a run starts (embedding its prior
can take hours) and while ``rela-train embed`` runs, :func:`stop_raises` makes SIGUSR1 and
SIGTERM raise :class:`StartupStopped` at once. The embedding store keeps every finished chunk
(it is written to survive an exception at any point, as it survives a kill), so the command
exits with :data:`REQUEUE` and the same command continues from there. While the ranks embed or
wait for rank 0, a rank so stopped tells the others (``peers.PeerFailure``), which stop with it;
elsewhere each rank stops on its own signal (a cluster signals every task of the job).

Distributed runs stop together: before each step every rank contributes its flag to one tiny
all-reduce (:meth:`StopController.agree`, which also agrees on skipping a step whose images were
unreadable on some rank and on a step checkpoint due by the clock), so a signal seen by any rank
stops all after the same step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NamedTuple

from rela_train.runtime import DistContext, agree_min

__all__ = [
    "REQUEUE",
    "STOP_SIGNALS",
    "StartupStopped",
    "StepAgreement",
    "StopController",
    "stop_raises",
]

# Exit status of `rela-train fit` stopped by SIGUSR1 or SIGTERM after writing its checkpoint:
# run the same command again (with `--resume auto`) to continue. EX_TEMPFAIL of sysexits.h,
# "a temporary failure; the user is invited to retry".
REQUEUE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


# The signals that ask for a stop and a requeue (SIGINT is an abort: KeyboardInterrupt).
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StartupStopped(Exception):
    """SIGUSR1 or SIGTERM arrived where there is no step boundary to wait for (a run's start-up,
    ``rela-train embed``): the work stopped at once, keeping what is durable. ``rank``: the rank
    the signal reached, when it was another one (its peers stop with it, for a requeue too)."""

    def __init__(self, signum: int, rank: int | None = None) -> None:
        self.signum = signum
        self.rank = rank
        where = "" if rank is None else f" on rank {rank}"
        super().__init__(f"stopped by {signal.Signals(signum).name}{where}")


@contextmanager
def stop_raises() -> Iterator[None]:
    """Within the block, SIGUSR1 and SIGTERM raise :class:`StartupStopped` in the main thread;
    the previous handlers come back on exit. Elsewhere than the main thread (where Python
    cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        raise StartupStopped(signum)

    previous = {signum: signal.signal(signum, handle) for signum in REQUEUE_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StepAgreement(NamedTuple):
    """What every rank agreed on before a step."""

    skip: bool  # some rank has no readable micro-batch: no rank trains this step
    stop: bool  # some rank was asked to stop: all stop after this step
    checkpoint: bool  # some rank finds a step checkpoint due: all write it after this step


class StopController:
    """Whether the run should stop at the next step boundary, and why.

    Use as a context manager around the loop (it installs the signal handlers, from the main
    thread only, and restores the previous ones on exit)."""

    def __init__(self, dist: DistContext) -> None:
        self.dist = dist
        self.requested = False  # asked on this rank (a signal or request())
        self.signum: int | None = None  # the signal that asked, if one did
        self.agreed = False  # the decision every rank reached before the last step
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def request(self) -> None:
        """Stop after the current step with a checkpoint (what the signals do)."""
        self.requested = True

    def agree(self, loaded: int, *, checkpoint: bool = False) -> StepAgreement:
        """The same on every rank: a step is skipped when some rank has no readable
        micro-batch (``loaded`` is this rank's count); a stop asked of any rank stops all; a
        step checkpoint due on any rank (``checkpoint``: by its clock) is written by all."""
        least, stop, due = agree_min(self.dist, [loaded, -int(self.requested), -int(checkpoint)])
        self.agreed = stop < 0
        return StepAgreement(skip=least == 0, stop=self.agreed, checkpoint=due < 0)

    def should_stop(self) -> bool:
        """Whether to stop now: the agreed decision when distributed (every rank stops at the
        same step), this rank's flag alone otherwise."""
        return self.agreed if self.dist.world > 1 else self.requested

    def describe(self) -> str:
        """What asked for the stop, for the log."""
        return "a stop request" if self.signum is None else signal.Signals(self.signum).name

    def __enter__(self) -> StopController:
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
