"""Work rank 0 does alone while the other ranks wait (``rela_train.peers.rank0_first``), in real
processes launched as torchrun launches them (the rendezvous store held by the launcher, here this
test): no time limit for a rank 0 that works, its error message for one that fails, and a frozen
rank 0 (SIGSTOP) noticed by its heartbeat within the timeout."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

TIMEOUT = 1.5  # --dist-timeout of the ranks, in seconds
WORKER = """
import datetime, sys, time
from pathlib import Path
import torch.distributed as dist
from rela_train.peers import rank0_first
from rela_train.runtime import DistContext, DistributedError
from rela_train.stop import StartupStopped, stop_raises

ready, mode, timeout = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
ctx = DistContext(2, dist.get_rank(), dist.get_rank(), "gloo", timeout, owns_group=True)

def work():
    if ctx.main:
        with stop_raises():  # as during a run's start-up: SIGUSR1 stops the work at once
            ready.write_text("working")
            if mode == "fails":
                raise ValueError("the data is missing")
            time.sleep(3 * timeout)  # longer than the timeout, alive (or frozen by the test)
    return "prepared"

try:
    print(rank0_first(ctx, "the test data", work, advice="Rerun it."), flush=True)
    code = 0
except (ValueError, DistributedError, StartupStopped) as error:
    print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
    code = {DistributedError: 3, StartupStopped: 75}.get(type(error), 2)
finally:
    ctx.close()
sys.exit(code)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(tmp_path: Path, mode: str) -> tuple[list[subprocess.Popen], dist.TCPStore]:
    port = _free_port()
    wait = datetime.timedelta(seconds=60)
    # The launcher's store, as torchrun's agent holds it: both ranks are its clients.
    store = dist.TCPStore("127.0.0.1", port, 2, True, wait, wait_for_workers=False)
    processes = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.update(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
        )  # fmt: skip
        command = [sys.executable, "-c", WORKER, str(tmp_path / "ready"), mode, str(TIMEOUT)]
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return processes, store


@pytest.mark.parametrize("mode", ["works", "fails", "frozen", "stopped"])
def test_the_others_wait_for_rank0_as_long_as_it_lives(tmp_path: Path, mode: str) -> None:
    processes, _store = _ranks(tmp_path, mode)
    rank0, rank1 = processes
    try:
        if mode in ("frozen", "stopped"):
            deadline = time.monotonic() + 120
            while not (tmp_path / "ready").exists():
                assert time.monotonic() < deadline, "rank 0 never started its work"
                assert rank0.poll() is None, rank0.communicate()
                time.sleep(0.05)
            # A preemption notice that reaches rank 0 alone stops both, each to be requeued.
            rank0.send_signal(signal.SIGSTOP if mode == "frozen" else signal.SIGUSR1)
        started = time.monotonic()
        out, err = rank1.communicate(timeout=120)
        waited = time.monotonic() - started
        if mode == "stopped":
            _, err0 = rank0.communicate(timeout=120)
    finally:
        for process in processes:
            process.kill()
            process.wait()
    if mode == "works":  # rank 0 worked for twice the timeout: no time limit while it lives
        assert rank1.returncode == 0, err
        assert out.strip() == "prepared"
    elif mode == "fails":
        assert rank1.returncode == 2, err
        assert err.strip().splitlines()[-1] == (
            "ValueError: rank 0 failed while preparing the test data: ValueError: the data is "
            "missing"
        )
    elif mode == "stopped":
        assert rank0.returncode == 75, err0
        assert err0.strip().splitlines()[-1] == "StartupStopped: stopped by SIGUSR1", err0
        assert rank1.returncode == 75, err
        assert err.strip().splitlines()[-1] == "StartupStopped: stopped by SIGUSR1 on rank 0"
    else:
        assert rank1.returncode == 3, err
        assert err.strip().splitlines()[-1] == (
            f"DistributedError: rank 1 of 2: rank 0 gave no sign of life for more than "
            f"{TIMEOUT:g} s (--dist-timeout) while rank 0 was preparing the test data: it died, "
            "hung or cannot be reached; see its log. Rerun it."
        )
        assert waited < TIMEOUT + 20
