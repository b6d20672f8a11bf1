"""Distributed training on CPU: two gloo ranks launched by torchrun on a generated JPEG folder.

One launch trains a job per selection policy (plus a stopped run); the tests then check what the
ranks recorded: identical subsets, losses and switch steps on both ranks, disjoint shards that
cover each step's global chunk, the ReLA loss going down, a stop asked by one rank stopping both,
and the 2-rank checkpoint resumed on 1 rank consuming exactly the data the 2-rank run would have.
Faults: a rank killed or frozen mid-run makes the survivor exit with a clear message.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rela_train.checkpoint import adapt_to_world, load_checkpoint
from rela_train.data.jpeg_folder import make_jpeg_folder
from rela_train.engine import Hooks, Trainer
from rela_train.presets import get_preset

HERE = Path(__file__).resolve().parent
POLICIES = ("random", "hard", "easy", "infobatch", "inbatch")
BASE = dict(
    dataset="folder",
    image_size=16,
    load_size=20,
    workers=0,
    batch_size=8,
    epochs=6,
    budget=0.5,
    prior="pixels:8",
    rela_dim=8,
    switch="const:0.25",
    optimizer="adamw",
    eval_every=0,
    probe_epochs=0,
    knn_k=5,
    lr=0.2,
    threads=1,
    progress=False,
    dist_timeout=60.0,  # a collective that hangs fails the test in a minute
)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("jpegs")
    train = make_jpeg_folder(root / "train", classes=4, per_class=24, size_range=(24, 64), seed=1)
    val = make_jpeg_folder(root / "val", classes=4, per_class=3, size_range=(24, 64), seed=2)
    return train, val


def _config(folders: tuple[Path, Path], **changes):
    train, val = folders
    return dict(BASE, data_dir=str(train), val_dir=str(val), **changes)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory, folders) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("runs")
    jobs = [{"name": p, "config": {"policy": p}} for p in POLICIES]
    jobs.append({"name": "adaptive", "config": {"policy": "random", "switch": "adaptive"}})
    # Rank 1 alone asks to stop after step 1 of epoch 1: both ranks must stop there.
    jobs.append({"name": "stopped", "config": {"policy": "random"}, "stop_at": [1, 1, 1]})
    # Most images unreadable: some micro-batches are empty on one rank only.
    corrupt = make_jpeg_folder(out / "corrupt", classes=4, per_class=6, seed=5, corrupt=40)
    jobs.append(
        {
            "name": "corrupt",
            "config": {"data_dir": str(corrupt), "prior": None, "budget": 1.0, "batch_size": 4},
        }
    )
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "config": _config(folders), "jobs": jobs}))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(HERE / "dist_worker.py"), str(spec),
    ]  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    runs: dict = {"_out": out}
    for job in jobs:
        name = job["name"]
        runs[name] = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    return runs


@pytest.mark.parametrize("name", [*POLICIES, "adaptive"])
def test_ranks_agree_and_shard_each_step(two_rank_runs, name: str) -> None:
    rank0, rank1 = two_rank_runs[name]
    assert rank0["status"] == rank1["status"] == "finished"
    assert rank0["orders"] == rank1["orders"]  # identical epoch subsets and shuffles
    assert len(rank0["orders"]) == BASE["epochs"]
    assert rank0["losses"] == rank1["losses"]  # step losses are averaged over the ranks
    assert rank0["phases"] == rank1["phases"]
    assert rank0["switch_step"] == rank1["switch_step"]
    if name != "adaptive":
        assert rank0["phases"].index("byol") == rank0["switch_step"] > 0
    steps = rank0["steps_per_epoch"]
    assert len(rank0["steps"]) == len(rank1["steps"]) == steps * BASE["epochs"]
    for s, (mine, theirs) in enumerate(zip(rank0["steps"], rank1["steps"], strict=True)):
        epoch, within = divmod(s, steps)
        order = rank0["orders"][str(epoch)]
        chunk = len(mine) + len(theirs)
        # The two shards are disjoint and together are the step's chunk of the global order.
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == sorted(order[within * chunk : (within + 1) * chunk])


def test_every_rank_embeds_its_share_of_the_prior(two_rank_runs) -> None:
    rank0, rank1 = two_rank_runs["random"]
    # fit --prior on two ranks: the training set is embedded once, split between the ranks.
    assert rank0["prior_rows"] > 0 and rank1["prior_rows"] > 0
    assert rank0["prior_rows"] + rank1["prior_rows"] == rank0["train_images"]


@pytest.mark.parametrize("name", POLICIES)
def test_loss_decreases(two_rank_runs, name: str) -> None:
    record = two_rank_runs[name][0]
    byol = [loss for loss, phase in zip(record["losses"], record["phases"], strict=True)
            if phase == "byol"]  # fmt: skip
    assert len(byol) >= 9
    assert sum(byol[-3:]) < sum(byol[:3]), byol


def test_a_stop_asked_by_one_rank_stops_both(two_rank_runs) -> None:
    rank0, rank1 = two_rank_runs["stopped"]
    assert rank0["status"] == rank1["status"] == "interrupted"
    # Asked after step 1 of epoch 1 on rank 1; the ranks agree at the start of the next step
    # and all stop after it.
    assert rank0["global_step"] == rank1["global_step"] == rank0["steps_per_epoch"] + 2


def test_a_step_unreadable_on_one_rank_is_skipped_by_all(two_rank_runs) -> None:
    rank0, rank1 = two_rank_runs["corrupt"]
    assert rank0["status"] == rank1["status"] == "finished"
    total = rank0["steps_per_epoch"] * BASE["epochs"]
    assert 0 < rank0["global_step"] == rank1["global_step"] < total
    assert rank0["losses"] == rank1["losses"]


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_runs, folders) -> None:
    out = two_rank_runs["_out"]
    full, _ = two_rank_runs["random"]
    stopped = out / "stopped"
    state = load_checkpoint(stopped)
    assert state["world_size"] == 2
    done_steps = state["counters"]["global_step"]
    steps: list[list[int]] = []
    trainer = Trainer(get_preset("synthetic-test"), stopped, resume=True, hooks=Hooks())
    assert trainer.world == 1 and trainer.accum_steps == 2  # same global batch: 8 x 2 x 1
    step = trainer.step

    def recorded(batches):
        steps.append(sorted(int(i) for b in batches for i in b.indices))
        return step(batches)

    trainer.step = recorded
    result = trainer.run()
    assert result.status == "finished"
    assert trainer.counters.global_step == full["global_step"]
    # Each remaining step consumes what the two ranks together consumed in the full run.
    rank0, rank1 = (r["steps"] for r in two_rank_runs["random"])
    both = [sorted(a + b) for a, b in zip(rank0, rank1, strict=True)]
    assert steps == both[done_steps:]
    saved = json.loads((stopped / "config.json").read_text())
    assert saved["accum_steps"] == 2 and saved["batch_size"] == 8


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused(two_rank_runs) -> None:
    stopped = two_rank_runs["_out"] / "stopped"
    state = load_checkpoint(stopped)
    config = get_preset("synthetic-test").replace(
        **_config(("x", "y")), policy="inbatch", accum_steps=1
    )
    with pytest.raises(ValueError, match="on 3 ranks no whole per-rank batch"):
        adapt_to_world(config, {**state, "world_size": 2}, 3, stopped, lambda message: None)
    same = config.replace(policy="random")
    assert adapt_to_world(same, {**state, "world_size": 3}, 3, stopped, print) == same  # same world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_dead_or_hung_rank_ends_the_job_with_a_clear_error(
    tmp_path: Path, folders, fault: str
) -> None:
    port = _free_port()
    config = _config(folders, epochs=200, prior=None, dist_timeout=5.0)
    flags = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    processes = []
    for rank in range(2):
        env = _env() | dict(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )  # fmt: skip
        command = [sys.executable, "-m", "rela_train", "fit", "--out", str(tmp_path / "run")]
        processes.append(
            subprocess.Popen(command + flags, env=env, stderr=subprocess.PIPE, text=True)
        )
    rank0, rank1 = processes
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline, "training did not start"
            assert rank0.poll() is None, rank0.stderr.read()
            time.sleep(0.2)
        rank1.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        code = rank0.wait(timeout=60)
        waited = time.monotonic() - start
        error = rank0.stderr.read()
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert code == 3, error
    assert "rank 0 of 2: a collective failed or waited more than 5 s" in error
    assert "another rank died, hung or cannot be reached" in error
    assert "--resume" in error
    assert waited < 40


def test_distributed_fit_needs_an_explicit_run_directory(monkeypatch, capsys) -> None:
    from rela_train import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["fit", "--preset", "synthetic-test"]) == 2
    assert "--out: a distributed run needs an explicit run directory" in capsys.readouterr().err


def test_collective_failures_exit_with_their_own_status(monkeypatch, capsys) -> None:
    from rela_train import cli, runs
    from rela_train.runtime import DistributedError

    def failing(*args, **kwargs):
        raise DistributedError("rank 1 of 2: a collective failed")

    monkeypatch.setattr(runs, "fit", failing)
    assert cli.main(["fit", "--preset", "synthetic-test", "--out", "unused"]) == 3
    assert "rank 1 of 2: a collective failed" in capsys.readouterr().err
