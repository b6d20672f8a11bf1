"""Step checkpoints (``fit --checkpoint-every N|DURATION``, ``--keep-checkpoints K``): written
without changing the run, rotated only once the new one is durable, safe on a full disk, and a
run SIGKILLed between two of them resumes bit for bit at 1 and at 2 ranks (gloo)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rela_train import checkpoint
from rela_train.checkpoint import CheckpointClock, load_checkpoint, step_checkpoints
from rela_train.engine import TIME_FIELDS
from rela_train.presets import get_preset
from rela_train.runs import fit
from rela_train.step_evals import StepEvaluations

HERE = Path(__file__).resolve().parent
# 256 images, budget 0.5: 8 steps per epoch, 3 epochs; switch after step 12 (mid-epoch 1).
CONFIG = dict(
    prior="pixels:8", budget=0.5, policy="infobatch", switch="const:0.5", epochs=3,
    eval_steps=5, probe_epochs=5, threads=1,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(**changes):
    return get_preset("synthetic-test").replace(**{**CONFIG, **changes})


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the clock's fields (the rest replays exactly)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        for name in (*TIME_FIELDS, "run_dir"):
            line.pop(name, None)
    return lines


def weights(run: Path) -> list[torch.Tensor]:
    return list(load_checkpoint(run)["learner"].values())


def assert_same_run(run: Path, reference: Path) -> None:
    assert records(run) == records(reference)
    assert all(torch.equal(a, b) for a, b in zip(weights(run), weights(reference), strict=True))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same run, never stopped, with step checkpoints every 3 steps."""
    run = tmp_path_factory.mktemp("full") / "run"
    assert fit(config(checkpoint_every="3"), run, log=lambda _: None).status == "finished"
    return run


def test_step_checkpoints_change_nothing_and_keep_the_newest(
    tmp_path: Path, uninterrupted: Path
) -> None:
    plain = tmp_path / "plain"
    fit(config(), plain, log=lambda _: None)
    assert_same_run(uninterrupted, plain)  # flushing the scores mid-epoch changes nothing
    kept = step_checkpoints(uninterrupted)
    # Steps 3, 6, 9, ... 21 (not 24: the end of an epoch writes last.pt); the newest 2 kept.
    assert [p.name for p in kept] == ["step-000000021.pt", "step-000000018.pt"]
    assert load_checkpoint(kept[0])["counters"]["global_step"] == 21
    assert load_checkpoint(uninterrupted)["counters"]["global_step"] == 24  # the final one
    assert not [p for p in (uninterrupted / "checkpoints").iterdir() if p.name.startswith(".")]


def _worker(spec: dict, *, ranks: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, str(HERE / "checkpoint_worker.py"), json.dumps(spec)]
    if ranks > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(ranks)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_sigkill_between_step_checkpoints_resumes_bit_for_bit(
    tmp_path: Path, uninterrupted: Path
) -> None:
    run = tmp_path / "killed"
    spec = {"out": str(run), "config": {**CONFIG, "checkpoint_every": "3"}}
    # Killed after step 14: past the switch (12) and the step evaluations at 10, between the
    # step checkpoints of steps 12 and 15.
    killed = _worker({**spec, "kill_at": 14})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert load_checkpoint(run)["counters"]["global_step"] == 12
    steps = [r["step"] for r in records(run) if "event" not in r]
    assert steps[-1] == 14  # the killed process wrote past its checkpoint: replaced on resume
    resumed = _worker({**spec, "resume": True})
    assert resumed.returncode == 0 and resumed.stdout.split() == ["finished"], resumed.stderr
    assert_same_run(run, uninterrupted)


@pytest.mark.slow
def test_a_sigkill_of_two_ranks_resumes_bit_for_bit(tmp_path: Path) -> None:
    spec = {"config": {**CONFIG, "checkpoint_every": "3", "dist_timeout": 60.0}}
    full = _worker({**spec, "out": str(tmp_path / "full")}, ranks=2)
    assert full.returncode == 0, full.stderr[-3000:]
    run = str(tmp_path / "killed")
    killed = _worker({**spec, "out": run, "kill_at": 10}, ranks=2)  # both ranks die
    assert killed.returncode != 0
    state = load_checkpoint(run)
    assert state["world_size"] == 2 and state["counters"]["global_step"] == 9
    resumed = _worker({**spec, "out": run, "resume": True}, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(Path(run), tmp_path / "full")


def test_a_full_disk_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: Path
) -> None:
    real = checkpoint.atomic_write

    def full_disk(path, write):
        if Path(path).name == "step-000000006.pt":

            def half(handle):
                handle.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            return real(path, half)
        return real(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="step-000000006.pt: no space left") as caught:
        fit(config(checkpoint_every="3"), run, log=lambda _: None)
    assert "previous checkpoint is kept" in str(caught.value)
    directory = run / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["last.pt", "step-000000003.pt"]
    assert load_checkpoint(run)["counters"]["global_step"] == 3
    monkeypatch.setattr(checkpoint, "atomic_write", real)
    assert fit(config(checkpoint_every="3"), run, resume=True, log=lambda _: None).status == (
        "finished"
    )
    assert_same_run(run, uninterrupted)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, uninterrupted: Path
) -> None:
    run = tmp_path / "run"
    _worker({"out": str(run), "config": {**CONFIG, "checkpoint_every": "3"}, "kill_at": 7})
    last = run / "checkpoints" / "last.pt"
    last.unlink()  # it was the hard link of step 6; damage a fresh copy instead
    last.write_bytes(b"not a checkpoint")
    messages: list[str] = []
    result = fit(config(checkpoint_every="3"), run, resume=True, log=messages.append)
    assert result.status == "finished"
    assert any("resuming from" in m and "step-000000006.pt" in m for m in messages), messages
    assert_same_run(run, uninterrupted)


def test_a_step_checkpoint_newer_than_last_pt_is_used(tmp_path: Path, uninterrupted: Path) -> None:
    # What a kill between writing step-000000006.pt and linking it as last.pt leaves.
    run = tmp_path / "run"
    _worker({"out": str(run), "config": {**CONFIG, "checkpoint_every": "3"}, "kill_at": 7})
    directory = run / "checkpoints"
    (directory / "last.pt").unlink()
    (directory / "last.pt").write_bytes((directory / "step-000000003.pt").read_bytes())
    messages: list[str] = []
    assert fit(config(checkpoint_every="3"), run, resume=True, log=messages.append).status == (
        "finished"
    )
    assert any("from step-000000006.pt at epoch 1/3, step 6/8" in m for m in messages), messages
    assert_same_run(run, uninterrupted)


def test_the_clock_counts_steps_or_wall_time(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = CheckpointClock("4")
    assert [s for s in range(1, 13) if steps.due(s)] == [4, 8, 12]
    now = [100.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now[0])
    clock = CheckpointClock("1.5m")
    assert clock.seconds == 90.0 and not clock.due(1)
    now[0] += 89.0
    assert not clock.due(2)
    now[0] += 1.0
    assert clock.due(3)
    clock.saved()
    assert not clock.due(4)
    assert CheckpointClock("2h").seconds == 7200.0 and CheckpointClock("90s").seconds == 90.0
    assert not CheckpointClock(None).due(1)


def test_step_evaluations_of_older_checkpoints_count_from_the_first_byol_step() -> None:
    # Checkpoints written before the key existed counted since_switch from the state at the
    # switch; the records are converted to the step records' convention.
    evals = StepEvaluations(2, (4, 4))
    old = [{"step": 8, "since_switch": 0, "phase": "rela", "knn_acc": 0.5},
           {"step": 4, "since_switch": None, "phase": "rela", "knn_acc": 0.4}]  # fmt: skip
    evals.load_state_dict({"snapshots": [], "records": old})
    assert [r["since_switch"] for r in evals.records] == [-1, None]
    evals.load_state_dict(evals.state_dict())  # today's: unchanged
    assert [r["since_switch"] for r in evals.records] == [-1, None]
