"""`rela-train embed` on several ranks (gloo on CPU, real processes, one store).

The ranks are launched as torchrun would start them (RANK, WORLD_SIZE, MASTER_ADDR, ...), each
through ``embed_worker.py``, which can park a rank at a chosen point for the test to SIGKILL it.
Checked: the store's bytes (rows, manifest, transport) are the same for 1, 2 and 3 ranks; after a
SIGKILL of one rank or of all ranks, a resume under another number of ranks recomputes only the
unfinished chunks and ends byte-identical; a dead or frozen rank makes the others stop with a
message naming the store and the resume command; wrong setups stop every rank with one line
before any row is written.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from image_folder import make_image_folder
from rela_train.cli import main
from rela_train.data.folder import ImageFolder
from rela_train.peers import Peers
from rela_train.prior.embedding import TRANSPORT_FILE, embed
from rela_train.prior.loaders import ModelPrior, load_prior
from rela_train.runtime import DistContext

import rela_kernels as rk
from rela_kernels import store as store_module

HERE = Path(__file__).resolve().parent
PRIOR = "random:resnet10-small"
IMAGES, CHUNK = 21, 3  # 7 chunks
OPTIONS = ["--input-size", "8", "--workers", "0", "--no-progress", "--batch-size", "3"]
OPTIONS += ["--chunk-rows", str(CHUNK), "--dim", "5"]
STORE_FILES = (store_module.DATA, store_module.MANIFEST, TRANSPORT_FILE)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    seed = int(torch.randint(0, 2**31 - 1, (1,)))  # new images on every run
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=7, seed=seed)


def _embed_here(folder: Path, out: Path) -> tuple[int, list[int]]:
    """``embed`` in this process on one thread (the ranks' setting: the transport's last bits
    depend on the thread count); returns the rows computed and the batch sizes encoded."""
    prior = load_prior(PRIOR, input_size=8)
    sizes: list[int] = []
    encode = prior.encode
    prior.encode = lambda images: sizes.append(len(images)) or encode(images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = embed(
            folder, prior, out, batch_size=3, workers=0, chunk_rows=CHUNK, dim=5, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    return result.computed_rows, sizes


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "store"
    assert _embed_here(folder, out)[0] == IMAGES
    return {name: (out / name).read_bytes() for name in STORE_FILES}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """``world`` ranks of `rela-train embed`, each writing its output into files under ``logs``."""

    def __init__(self, world: int, argv, logs: Path, park: dict[int, str] | None = None) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        port = str(_free_port())
        self.processes = []
        for rank in range(world):
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            env.update(
                RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
            )  # fmt: skip
            command = [sys.executable, str(HERE / "embed_worker.py")]
            command += [(park or {}).get(rank, "none"), str(logs / f"ready.{rank}"), "--"]
            command += ["embed", *argv(rank)]
            with open(logs / f"out.{rank}", "w") as out, open(logs / f"err.{rank}", "w") as err:
                self.processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=err))

    def wait(self, timeout: float = 120) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in self.processes]
        finally:
            self.kill()

    def wait_parked(self, ranks, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for rank in ranks:
            while not (self.logs / f"ready.{rank}").exists():
                assert self.processes[rank].poll() is None, self.err(rank)
                assert time.monotonic() < deadline, f"rank {rank} never parked"
                time.sleep(0.05)

    def kill(self, ranks=None) -> None:
        for rank, process in enumerate(self.processes):
            if (ranks is None or rank in ranks) and process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()

    def out(self, rank: int) -> str:
        return (self.logs / f"out.{rank}").read_text()

    def err(self, rank: int) -> str:
        return (self.logs / f"err.{rank}").read_text()

    def error_line(self, rank: int) -> str:
        """The command's one-line error (torch's own C++ warnings on stderr aside)."""
        lines = [line for line in self.err(rank).splitlines() if line.startswith("rela-train")]
        assert len(lines) == 1, self.err(rank)
        return lines[0]


def _argv(folder: Path, out: Path, *extra: str):
    return lambda rank: ["--data-dir", str(folder), "--prior", PRIOR, "--out", str(out), *OPTIONS,
                         "--dist-timeout", "4", *extra]  # fmt: skip


def _computed(job: Job, world: int) -> list[int]:
    """Rows each rank reports it computed."""
    counts = []
    for rank in range(world):
        text = job.out(rank)
        if rank == 0:
            counts.append(int(text.split(" embeddings (")[1].split()[0]))
        else:
            counts.append(int(text.split(f"rank {rank} of {world}: ")[1].split()[0]))
    return counts


def _assert_same_store(out: Path, reference: dict[str, bytes]) -> None:
    for name in STORE_FILES:
        assert (out / name).read_bytes() == reference[name], name
    leftovers = {p.name for p in out.iterdir()} - set(STORE_FILES)
    assert leftovers <= {store_module.LOCK, store_module.WRITERS}, leftovers  # no journals left


@pytest.mark.parametrize("world", [2, 3])
def test_every_world_size_writes_the_same_bytes(folder, reference, tmp_path, world) -> None:
    out = tmp_path / "store"
    job = Job(world, _argv(folder, out), tmp_path / "logs")
    assert job.wait() == [0] * world, [job.err(r) for r in range(world)]
    counts = _computed(job, world)
    assert sum(counts) == IMAGES and min(counts) > 0, counts  # every rank did its share
    _assert_same_store(out, reference)


def test_a_killed_rank_stops_the_others_and_a_resume_on_three_ranks_ends_identical(
    folder, reference, tmp_path
) -> None:
    out = tmp_path / "store"
    # Rank 1 dies with its 2nd chunk's rows written but not yet claimed in its journal.
    job = Job(2, _argv(folder, out), tmp_path / "killed", park={1: "inside-commit:2"})
    try:
        job.wait_parked([1])
        job.kill([1])
        started = time.monotonic()
        code = job.processes[0].wait(timeout=60)
        waited = time.monotonic() - started
    finally:
        job.kill()
    assert code == 3, job.err(0)
    line = job.error_line(0)
    assert "rank 0 of 2: rank 1 gave no sign of life for more than 4 s (--dist-timeout)" in line
    assert f"while embedding into {out}" in line
    assert f"resume with `rela-train embed --data-dir {folder} --prior {PRIOR} --out {out}" in line
    assert waited < 30
    # Rank 0 finished its 4 chunks, rank 1 one: the manifest claims nothing the journals do not
    # hold, and no chunk past what is durable.
    assert rk.EmbeddingStore.open(out).rows_done == 0

    resumed = Job(3, _argv(folder, out), tmp_path / "resumed")
    assert resumed.wait() == [0, 0, 0], [resumed.err(r) for r in range(3)]
    assert sum(_computed(resumed, 3)) == 2 * CHUNK  # chunks 3 and 5 only
    _assert_same_store(out, reference)


def test_a_frozen_rank_stops_the_others_as_a_killed_one_does(folder, tmp_path) -> None:
    out = tmp_path / "store"
    # Rank 1 is stopped (SIGSTOP: its heartbeat stops too) after claiming its first chunk.
    job = Job(2, _argv(folder, out), tmp_path / "frozen", park={1: "between:1"})
    try:
        job.wait_parked([1])
        job.processes[1].send_signal(signal.SIGSTOP)
        started = time.monotonic()
        code = job.processes[0].wait(timeout=60)
        waited = time.monotonic() - started
    finally:
        job.kill()
    assert code == 3, job.err(0)
    line = job.error_line(0)
    assert "rank 0 of 2: rank 1 gave no sign of life for more than 4 s (--dist-timeout)" in line
    assert f"while embedding into {out}" in line
    assert f"resume with `rela-train embed --data-dir {folder} --prior {PRIOR} --out {out}" in line
    assert waited < 30


def test_all_ranks_killed_then_one_process_resumes_identical(folder, reference, tmp_path) -> None:
    out = tmp_path / "store"
    job = Job(2, _argv(folder, out), tmp_path / "killed", park=dict.fromkeys(range(2), "between:2"))
    try:
        job.wait_parked(range(2))
    finally:
        job.kill()
    computed, sizes = _embed_here(folder, out)
    assert computed == sum(sizes) == IMAGES - 4 * CHUNK  # chunks 0-3 were claimed: kept
    _assert_same_store(out, reference)


def _in_threads(world: int, work) -> list:
    """``work(peers)`` on ``world`` ranks played by threads of this process, over a real TCPStore
    (the protocol is the processes' one; only the process start-up is saved). Returns each
    rank's result or the exception it raised."""
    port = _free_port()
    wait = datetime.timedelta(seconds=30)
    master = dist.TCPStore("127.0.0.1", port, world, True, wait, wait_for_workers=False)
    results: list = [None] * world

    def one(rank: int) -> None:
        store = master if rank == 0 else dist.TCPStore("127.0.0.1", port, world, False, wait)
        ctx = DistContext(world, rank, rank, "gloo", 4.0, owns_group=False)
        try:
            with Peers(ctx, "embedding", "Resume.", store=store, scope="test") as peers:
                results[rank] = work(peers)
        except Exception as error:
            results[rank] = error

    threads = [threading.Thread(target=one, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return results


def _embed_rank(data: Path, out: Path, spec: str = PRIOR):
    options = {"batch_size": 3, "workers": 0, "chunk_rows": CHUNK, "dim": 5, "progress": False}
    return lambda peers: embed(
        data, load_prior(spec, input_size=8), out, **options, peers=peers, log=lambda m: None
    )


def test_ranks_started_differently_stop_before_writing(folder, tmp_path) -> None:
    out = tmp_path / "store"
    other = make_image_folder(tmp_path / "other", classes=3, per_class=7, seed=1)
    cases = [
        ([_embed_rank(folder, out), _embed_rank(folder, out, f"{PRIOR}:1")],
         f"--prior: the ranks were started with different values, rank 0 with '{PRIOR}' and "
         f"rank 1 with '{PRIOR}:1'"),
        ([_embed_rank(folder, out), _embed_rank(other, out)],
         f"--data-dir: the ranks were started with different values, rank 0 with '{folder}' and "
         f"rank 1 with '{other}'"),
    ]  # fmt: skip
    for works, message in cases:
        results = _in_threads(2, lambda peers, works=works: works[peers.rank](peers))
        for result in results:
            assert isinstance(result, ValueError) and message in str(result), result
            assert len(str(result).splitlines()) == 1
        assert not out.exists()  # detected before anything was created

    # A rank that cannot even load its inputs stops the others with its message.
    works = [_embed_rank(folder, out), _embed_rank(tmp_path / "void", out)]
    leader, member = _in_threads(2, lambda peers: works[peers.rank](peers))
    assert isinstance(member, FileNotFoundError | ValueError) and "void" in str(member), member
    assert isinstance(leader, ValueError) and str(leader).startswith("rank 1: "), leader
    assert "void" in str(leader) and not out.exists()

    elsewhere = tmp_path / "rank1-only"
    works = [_embed_rank(folder, out), _embed_rank(folder, elsewhere)]
    leader, member = _in_threads(2, lambda peers: works[peers.rank](peers))
    assert isinstance(leader, ValueError), leader
    assert f"the store directory {out} is not shared by every rank: rank(s) 1" in str(leader)
    assert isinstance(member, ValueError), member
    assert "rank 1 cannot see the store directory" in str(member)
    assert not out.exists() and not elsewhere.exists()  # nothing left behind


def test_a_second_job_is_refused_with_the_holder_named(folder, tmp_path, capsys) -> None:
    out = tmp_path / "store"
    argv = ["embed", "--data-dir", str(folder), "--prior", PRIOR, "--out", str(out), *OPTIONS]
    prior = load_prior(PRIOR, input_size=8)
    assert isinstance(prior, ModelPrior)
    fingerprint = ImageFolder(folder).fingerprint
    with rk.EmbeddingStore.create_or_resume(
        out, IMAGES, prior.dim, fingerprint=fingerprint, prior=prior.identity, input_size=8,
        chunk_rows=CHUNK,
    ):  # fmt: skip
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert f"another process is writing the store at {out} (pid {os.getpid()} on " in error
    (out / "notes.txt").write_text("mine")
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "notes.txt, which is not part of an embedding" in error
