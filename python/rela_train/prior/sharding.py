"""Filling one embedding store with every rank of a job (``torchrun ... embed``, ``fit --prior``).

The protocol, in the order the ranks go through it (the design and why a SIGKILL of any rank at
any point is safe are in docs/ARCHITECTURE.md, "Embedding with many ranks"):

1. **Agree.** Every rank publishes what decides the store's bytes (the data's fingerprint, the
   prior's identity, batch and chunk sizes, ...); any difference stops all ranks with one line
   naming the flag and both values, before anything is created.
2. **Lock and look.** Rank 0, the leader, takes the store's lock with a fresh job token recorded
   in it; every other rank must read that token in its own view of the directory, else the
   directory is not shared and all ranks stop (the leader removes what it created).
3. **Prepare.** The leader creates or resumes the store: journals a killed job left are folded
   in, damaged chunks are refused (or repaired with ``--repair``), and it publishes the list of
   pending chunks.
4. **Share out.** Rank ``r`` computes pending chunks ``r, r + W, r + 2W, ...``; each chunk's rows
   are written at their own offset and made durable, then claimed in the rank's journal. Between
   chunks each rank checks that the others live (heartbeats) and that none has failed.
5. **Finish.** Every other rank closes the store and says it is done; the leader folds all
   journals into the manifest, computes any chunk whose claim it could not verify, and says so.

Each chunk is computed from the same batches whichever rank computes it, so the store's bytes do
not depend on the number of ranks (for a deterministic prior on the same kind of device).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rela_kernels as rk
from rela_train.peers import Peers

__all__ = ["ShardResult", "fill_sharded", "report_setup_failure"]

# compute(store, chunks, write, progress): computes ``chunks`` in order, handing each to write.
Compute = Callable[[rk.EmbeddingStore, list[tuple[int, int]], Callable[..., None], Any], None]


@dataclass(frozen=True)
class ShardResult:
    computed_rows: int  # rows this rank computed
    repaired_rows: int  # rows of damaged chunks the leader recomputed first
    seconds: float  # time this rank spent computing its own chunks


class _Stop(Exception):
    """Another rank failed: this one stops after its current chunk."""


def report_setup_failure(peers: Peers, error: BaseException) -> None:
    """Tell the other ranks that this one failed before :func:`fill_sharded` (a prior or a
    folder it could not load): they stop with its message instead of waiting for it."""
    if peers.world > 1:
        peers.publish_failure("identity", error)


def _agree(peers: Peers, identity: Mapping[str, tuple[str, str]]) -> None:
    """Stop every rank if any was started with other arguments (``flag -> (value compared,
    value shown)``)."""
    peers.publish("identity", json.dumps({k: list(v) for k, v in identity.items()}))
    seen = peers.collect("identity", range(peers.world))
    for rank, value in sorted(seen.items()):
        peers.raise_failure(rank, value)
    first = json.loads(seen[0])
    for rank in range(1, peers.world):
        other = json.loads(seen[rank])
        for flag, (value, shown) in first.items():
            theirs = other.get(flag, [None, None])
            if theirs[0] != value:
                same = " (the same text: it names different files or weights there)"
                same = same if theirs[1] == shown else ""
                raise ValueError(
                    f"{flag}: the ranks were started with different values, rank 0 with "
                    f"{shown!r} and rank {rank} with {theirs[1]!r}{same}; start every rank with "
                    "the same arguments"
                )


def fill_sharded(
    peers: Peers,
    out: Path,
    *,
    identity: Mapping[str, tuple[str, str]],
    spec: rk.StoreSpec,
    compute: Compute,
    prepare: Callable[[rk.EmbeddingStore], int] | None = None,
    companions: Sequence[str] = (),
    progress: Callable[[int], Any] | None = None,
    log: Callable[[str], None] = print,
) -> ShardResult:
    """Fill the store at ``out`` together with the other ranks of ``peers`` (module doc).

    Args:
        identity: what every rank must agree on, ``flag -> (value compared, value shown)``.
        spec: what the store holds (its identity, chunk size and metadata).
        compute: computes chunks of the store and hands each to the writer it is given.
        prepare: run by the leader alone on the opened store before the chunks are shared out
            (checks and repairs); returns the rows it recomputed.
        companions: the caller's own files in the store directory (see ``create_or_resume``).
        progress: called with this rank's row count; returns a progress bar (or None).

    Raises:
        ValueError: ranks disagree, the directory is not shared, or a rank failed (its message).
        DistributedError: a rank died or hung, or the rendezvous store is gone.
    """
    _agree(peers, identity)
    if peers.main:
        return _lead(peers, out, spec, compute, prepare, companions, progress, log)
    return _follow(peers, out, spec, compute, progress, log)


def _lead(peers, out, spec, compute, prepare, companions, progress, log) -> ShardResult:
    members = range(1, peers.world)
    token = secrets.token_hex(8)
    published: list[str] = []

    def everyone_sees_it() -> None:
        peers.publish("token", token)
        published.append("token")
        seen = peers.collect("sees", members)
        blind = [rank for rank, value in sorted(seen.items()) if peers.failure_in(rank, value)]
        if blind:
            names = ", ".join(map(str, blind))
            raise ValueError(
                f"--out: the store directory {out} is not shared by every rank: rank(s) {names} "
                "cannot see what rank 0 wrote there; put it on a file system that all nodes "
                "mount, at a path every node can reach"
            )

    try:
        store = rk.EmbeddingStore.lead(
            out, spec, job=token, companions=companions, on_locked=everyone_sees_it
        )
    except BaseException as error:
        peers.publish_failure("ready" if published else "token", error)
        raise
    with store:
        try:
            repaired = prepare(store) if prepare is not None else 0
            store.journal_to("rank0")
            pending = store.pending_chunks()
            peers.publish("ready", json.dumps([start for start, _ in pending]))
        except BaseException as error:
            peers.publish_failure("ready", error)
            raise
        log(
            f"{out}: {len(pending)} chunk(s) to embed, shared out among {peers.world} ranks"
            if pending
            else f"{out}: all {store.n} embeddings already stored"
        )
        try:
            rows, seconds = _compute_share(peers, store, pending, compute, progress, log)
            peers.publish("done", "ok")
            results = peers.collect("done", members)
            for rank, value in sorted(results.items()):
                peers.raise_failure(rank, value)
            # Every other rank closed the store before saying it was done: nobody writes now.
            store.absorb_journals()
            rest = store.pending_chunks()
            if rest:
                log(f"{out}: computing {len(rest)} chunk(s) whose claims did not verify")
                compute(store, rest, store.write_chunk, None)
                rows += sum(stop - start for start, stop in rest)
            store.require_complete()
        except BaseException as error:
            peers.publish_failure("final", error)
            raise
        peers.publish("final", "ok")
    # The rendezvous store may live in this process: stay until every rank has read "final".
    peers.collect("bye", members)
    return ShardResult(rows, repaired, seconds)


def _follow(peers, out, spec, compute, progress, log) -> ShardResult:
    value = peers.collect("token", [0])[0]
    peers.raise_failure(0, value)
    sees = rk.EmbeddingStore.holder_job(out) == value
    if not sees:
        error = ValueError(rk.EmbeddingStore.not_shared_message(out, value))
        peers.publish_failure("sees", error)
        raise ValueError(
            f"--out: rank {peers.rank} cannot see the store directory {out} that rank 0 locked "
            "(it is not shared); put it on a file system that all nodes mount"
        )
    peers.publish("sees", "ok")
    ready = peers.collect("ready", [0])[0]
    peers.raise_failure(0, ready)
    try:
        store = rk.EmbeddingStore.follow(out, value, f"rank{peers.rank}", spec)
        with store:
            pending = [store.chunk_bounds(s // store.chunk_rows) for s in json.loads(ready)]
            rows, seconds = _compute_share(peers, store, pending, compute, progress, log)
        # Closed (its lock on .writers released) before the leader hears it is done.
    except BaseException as error:
        peers.publish_failure("done", error)
        raise
    peers.publish("done", "ok")
    final = peers.collect("final", [0])[0]
    peers.publish("bye", "ok")
    peers.raise_failure(0, final)
    return ShardResult(rows, 0, seconds)


def _compute_share(peers, store, pending, compute, progress, log) -> tuple[int, float]:
    """Compute this rank's chunks of ``pending``, checking on the others between chunks."""
    mine = pending[peers.rank :: peers.world]
    rows = sum(stop - start for start, stop in mine)
    started = time.perf_counter()
    if not mine:
        return 0, 0.0

    def write(start: int, values: Any, *, skipped: Mapping[int, str] | None = None) -> None:
        store.write_chunk(start, values, skipped=skipped)
        failure = peers.failed("done") or (None if peers.main else peers.failed("final", [0]))
        if failure is not None:
            if failure.shared:
                raise failure.error()
            raise _Stop(f"stopped because rank {failure.rank}: {failure.message}")
        peers.check()

    bar = progress(rows) if progress is not None else None
    try:
        compute(store, mine, write, bar)
    except _Stop as stop:
        raise ValueError(f"rank {peers.rank}: {stop}") from None
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    log(
        f"rank {peers.rank} of {peers.world}: embedded {rows} images in {len(mine)} chunk(s), "
        f"{seconds:.1f} s ({rows / max(seconds, 1e-9):.1f} images/s)"
    )
    return rows, seconds
