"""Ranks that wait for each other without a time limit, yet notice a rank that died or hung.

Work shared out among the ranks of a job (embedding a dataset) takes each rank a different,
unbounded time, longer than any sensible collective timeout. :class:`Peers` coordinates such work
through the rendezvous key-value store instead of collectives: each rank publishes small text
values under a key (:meth:`Peers.publish`) and the others poll for them (:meth:`Peers.collect`).
A thread of every rank bumps a heartbeat counter in the store; a rank whose counter stays still
for ``--dist-timeout`` seconds is dead, frozen or unreachable, and waiting for it raises
:class:`~rela_train.runtime.DistributedError` with the caller's advice on how to resume. Losing
the store itself (it lives with rank 0 or the launcher) raises the same error.

A rank that fails publishes its failure under the key the others wait on
(:meth:`Peers.publish_failure`); they recognise it (:meth:`Peers.failure_in`, :meth:`Peers.failed`)
and stop with its message, as a :class:`~rela_train.runtime.DistributedError` when the failing
rank had lost a peer itself, else as a ``ValueError`` naming the rank. This is the one encoding of
a rank's failure in the store. :func:`rank0_first` is work rank 0 does while the others wait for
it, watched by the same heartbeats.

Keys live under a prefix unique to the launch and to the order in which ranks create their
:class:`Peers`, which is the same on every rank.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

from rela_train.runtime import DistContext, DistributedError
from rela_train.stop import StartupStopped

__all__ = ["PeerFailure", "Peers", "rank0_first"]

T = TypeVar("T")
_SEQUENCE = itertools.count()
# What a published failure starts with; the rest is JSON (PeerFailure's message and kind).
_FAILED = "failed: "


@dataclass(frozen=True)
class PeerFailure:
    """A failure another rank published: its rank, its one-line message, and whether it was a
    distributed failure (that rank lost a peer or the store) rather than its own error."""

    rank: int
    message: str
    distributed: bool
    signal: int | None = None  # a rank was stopped by this signal (StartupStopped) ...
    signal_rank: int | None = None  # ... this one, when not ``rank`` (which passed it on)

    @property
    def shared(self) -> bool:
        """Whether it stops every rank as it stopped that one: a lost peer or store, or a stop
        signal (then each rank raises :meth:`error` as it is, not as that rank's own error)."""
        return self.distributed or self.signal is not None

    def error(self) -> Exception:
        """What this rank raises for it: the same :class:`DistributedError`, a
        :class:`StartupStopped` naming that rank (a stop asked of one rank stops all, each with
        the requeue status), or a ``ValueError`` whose message names the failing rank."""
        if self.signal is not None:
            return StartupStopped(
                self.signal, self.rank if self.signal_rank is None else self.signal_rank
            )
        if self.distributed:
            return DistributedError(self.message)
        if self.message.startswith("rank "):
            return ValueError(self.message)
        return ValueError(f"rank {self.rank}: {self.message}")


class Peers:
    """The ranks of ``ctx`` doing ``what`` together; ``advice`` ends every failure message."""

    def __init__(
        self,
        ctx: DistContext,
        what: str,
        advice: str,
        *,
        store: dist.Store | None = None,
        scope: str | None = None,
        poll: float = 0.1,
    ) -> None:
        """``store``: the key-value store (default: the process group's rendezvous store);
        ``scope``: the key prefix, the same on every rank (default: one per launch and use)."""
        self.ctx = ctx
        self.what = what
        self.advice = advice
        self._poll = poll
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (heartbeat, when it last moved)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if ctx.world == 1:
            return
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefix = f"rela_train/peers/{restart}/{next(_SEQUENCE) if scope is None else scope}"
        base = store if store is not None else dist.distributed_c10d._get_default_store()
        self._store = dist.PrefixStore(prefix, base)
        # The heartbeat thread talks over its own connection to the store.
        self._interval = min(1.0, ctx.timeout / 5)
        beat_base = base
        if hasattr(base, "clone"):
            beat_base = base.clone()
            # A beat waits at most a few intervals for the store, so that close() can always
            # join the thread: one left inside a store call when the interpreter exits aborts
            # the process ("terminate called without an active exception").
            beat_base.set_timeout(datetime.timedelta(seconds=5 * self._interval))
        self._beat_store = dist.PrefixStore(prefix, beat_base)
        self._beat()
        self._thread = threading.Thread(target=self._beat_forever, name="peers-heartbeat")
        self._thread.daemon = True
        self._thread.start()

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world(self) -> int:
        return self.ctx.world

    @property
    def main(self) -> bool:
        return self.ctx.main

    # -------------------------------------------------------------------------------------------

    def _beat(self) -> None:
        self._beat_store.add(f"beat/{self.rank}", 1)

    def _beat_forever(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception:  # slow or gone: the waits of the main thread report a lost store
                continue

    def _lost(self, error: BaseException) -> DistributedError:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        return DistributedError(
            f"rank {self.rank} of {self.world}: lost the rendezvous store (rank 0 or the launcher "
            f"is gone) while {self.what}: {cause}. {self.advice}"
        )

    def _dead(self, rank: int) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.world}: rank {rank} gave no sign of life for more than "
            f"{self.ctx.timeout:g} s (--dist-timeout) while {self.what}: it died, hung or cannot "
            f"be reached; see its log. {self.advice}"
        )

    def check(self, ranks: Iterable[int] | None = None) -> None:
        """Raise :class:`DistributedError` if one of ``ranks`` (default: all others) is dead."""
        if self.world == 1:
            return
        now = time.monotonic()
        for rank in self._others() if ranks is None else ranks:
            try:
                beat = self._store.add(f"beat/{rank}", 0)
            except Exception as error:
                raise self._lost(error) from error
            last = self._seen.get(rank)
            if last is None or beat != last[0]:
                self._seen[rank] = (beat, now)
            elif now - last[1] > self.ctx.timeout:
                raise self._dead(rank)

    def _others(self) -> list[int]:
        return [r for r in range(self.world) if r != self.rank]

    def publish(self, key: str, value: str) -> None:
        """Make ``value`` this rank's answer under ``key``."""
        if self.world == 1:
            return
        try:
            self._store.set(f"{key}/{self.rank}", value)
        except Exception as error:
            raise self._lost(error) from error

    def publish_failure(self, key: str, error: BaseException) -> None:
        """Publish ``error`` as this rank's answer under ``key``, in the form :meth:`failure_in`
        and :meth:`failed` recognise; a store that is already gone is ignored (the caller raises
        ``error`` anyway)."""
        try:
            self.publish(key, self.failure_value(error))
        except DistributedError:
            pass

    @staticmethod
    def failure_value(error: BaseException) -> str:
        """``error`` in the published form (:meth:`failure_in` reads it back)."""
        message = " ".join(str(error).split()) or type(error).__name__
        value = {"message": message, "distributed": isinstance(error, DistributedError)}
        if isinstance(error, StartupStopped):
            value["signal"] = error.signum
            value["signal_rank"] = error.rank
        return _FAILED + json.dumps(value)

    @staticmethod
    def failure_in(rank: int, value: str) -> PeerFailure | None:
        """The failure ``rank`` published as ``value``, or None when ``value`` is not one."""
        if not value.startswith(_FAILED):
            return None
        fields = json.loads(value.removeprefix(_FAILED))
        return PeerFailure(
            rank,
            fields["message"],
            fields["distributed"],
            fields.get("signal"),
            fields.get("signal_rank"),
        )

    @staticmethod
    def raise_failure(rank: int, value: str) -> None:
        """Raise the failure ``rank`` published as ``value``, if it is one."""
        failure = Peers.failure_in(rank, value)
        if failure is not None:
            raise failure.error()

    def collect(self, key: str, ranks: Iterable[int]) -> dict[int, str]:
        """Every one of ``ranks``' values under ``key``, waiting for them as long as they live."""
        wanted = list(ranks)
        if self.world == 1:
            return {}
        values: dict[int, str] = {}
        while True:
            for rank in wanted:
                if rank in values:
                    continue
                try:
                    if self._store.check([f"{key}/{rank}"]):
                        values[rank] = self._store.get(f"{key}/{rank}").decode("utf-8")
                except Exception as error:
                    raise self._lost(error) from error
            if len(values) == len(wanted):
                return values
            self.check(r for r in wanted if r not in values and r != self.rank)
            time.sleep(self._poll)

    def failed(self, key: str, ranks: Iterable[int] | None = None) -> PeerFailure | None:
        """The first failure published under ``key`` by ``ranks`` (default: all others),
        without waiting."""
        if self.world == 1:
            return None
        for rank in self._others() if ranks is None else ranks:
            try:
                name = f"{key}/{rank}"
                value = self._store.get(name).decode() if self._store.check([name]) else ""
            except Exception as error:
                raise self._lost(error) from error
            failure = self.failure_in(rank, value)
            if failure is not None:
                return failure
        return None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # a beat waits at most its store's timeout
            self._thread = None

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rank0_first(
    ctx: DistContext, key: str, work: Callable[[], T], *, advice: str = "", poll: float = 0.5
) -> T:
    """Run ``work`` on rank 0, then on the other ranks (which typically reuse its result on
    disk). The others wait without a time limit while rank 0's heartbeat goes on: if rank 0
    fails they raise its error message, and if it dies or hangs for ``--dist-timeout`` they raise
    :class:`DistributedError` (ending with ``advice``)."""
    if ctx.world == 1:
        return work()
    with Peers(ctx, f"rank 0 was preparing {key}", advice, poll=poll) as peers:
        if ctx.main:
            try:
                result = work()
            except BaseException as error:
                kept = isinstance(error, (DistributedError, StartupStopped))
                named = RuntimeError(f"{type(error).__name__}: {error}")  # names its kind
                peers.publish_failure("done", error if kept else named)
                raise
            peers.publish("done", "ok")
            return result
        failure = peers.failure_in(0, peers.collect("done", [0])[0])
    if failure is not None:
        if failure.shared:
            raise failure.error()
        raise ValueError(f"rank 0 failed while preparing {key}: {failure.message}")
    return work()
