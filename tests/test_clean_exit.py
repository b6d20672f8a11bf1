"""A distributed run leaves cleanly: twenty short two-rank fits (gloo, one thread each), launched
as torchrun launches ranks, all end with status 0 on both ranks, none aborts (SIGABRT,
"terminate called without an active exception") and none hangs at exit; and a DDP run's log holds
no torch warning.

A rank that exits is given :data:`EXIT_GRACE` seconds for its peer to exit too: a peer still
running then is hung in its teardown (the run as a whole also has a generous time limit, for a
machine under load).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

RUNS = 20
RUN_LIMIT = 300.0  # seconds for one whole run (both ranks), however loaded the machine
EXIT_GRACE = 60.0  # seconds a rank may take to exit after its peer did
WARNING = re.compile(r"warn", re.IGNORECASE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    env.pop("RELA_TRAIN_DEBUG", None)
    return env


def _two_ranks(out: Path, extra: list[str]) -> dict:
    """One two-rank ``fit``; returns each rank's status and stderr, and whether it hung."""
    port = _free_port()
    command = [sys.executable, "-m", "rela_train", "fit", "--preset", "synthetic-test"]
    command += ["--out", str(out), *extra]
    logs = [out.with_name(f"{out.name}.rank{rank}.err") for rank in range(2)]
    processes = []
    for rank in range(2):
        with open(logs[rank], "w") as err:
            processes.append(
                subprocess.Popen(
                    command, env=_env(rank, port), stdout=subprocess.DEVNULL, stderr=err
                )
            )
    deadline = time.monotonic() + RUN_LIMIT
    first_exit = None
    hung = False
    try:
        while any(p.poll() is None for p in processes):
            now = time.monotonic()
            if first_exit is None and any(p.poll() is not None for p in processes):
                first_exit = now
            if now > deadline or (first_exit is not None and now - first_exit > EXIT_GRACE):
                hung = True
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return {
        "codes": [p.returncode for p in processes],
        "stderr": [log.read_text() for log in logs],
        "hung": hung,
    }


@pytest.mark.slow
def test_twenty_two_rank_fits_exit_cleanly(tmp_path: Path) -> None:
    parallel = max(2, min(5, os.cpu_count() or 2))
    with ThreadPoolExecutor(parallel) as pool:
        runs = list(
            pool.map(lambda i: _two_ranks(tmp_path / f"run{i}", ["--epochs", "1"]), range(RUNS))
        )
    aborted = [
        i
        for i, run in enumerate(runs)
        if -6 in run["codes"] or any("terminate called" in err for err in run["stderr"])
    ]
    hung = [i for i, run in enumerate(runs) if run["hung"]]
    failed = [i for i, run in enumerate(runs) if run["codes"] != [0, 0]]
    details = {i: (runs[i]["codes"], runs[i]["stderr"][0][-800:], runs[i]["stderr"][1][-800:])
               for i in sorted({*aborted, *hung, *failed})}  # fmt: skip
    assert (len(aborted), len(hung), len(failed)) == (0, 0, 0), details
    warned = {
        i: [line for err in run["stderr"] for line in err.splitlines() if WARNING.search(line)]
        for i, run in enumerate(runs)
    }
    assert not any(warned.values()), warned


@pytest.mark.slow
def test_a_ddp_run_through_every_kind_of_step_logs_no_warning(tmp_path: Path) -> None:
    # ReLA, BYOL, a blend that also freezes the backbone: every DDP wrapper the trainer makes.
    extra = ["--epochs", "3", "--prior", "pixels:8", "--switch", "const:0.34"]
    extra += ["--switch-transition", "blend:3+warm-heads:2", "--accum-steps", "2"]
    run = _two_ranks(tmp_path / "run", extra)
    assert run["codes"] == [0, 0] and not run["hung"], run
    for err in run["stderr"]:
        assert not [line for line in err.splitlines() if WARNING.search(line)], err
    assert "done: kNN" in run["stderr"][0]
