"""Run directories: one writer at a time (a second is refused, naming the holder), foreign files
never overwritten, a failed start leaves nothing behind, and a run that could not train a single
step is refused before it starts (or, when every step's images were unreadable, fails loudly)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from image_folder import make_image_folder
from rela_train import cli
from rela_train.run_directory import LOCK

FAST = ["--preset", "synthetic-test", "--epochs", "1", "--eval-every", "0"]
FAST += ["--probe-epochs", "0", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", "summary.json"])
def test_foreign_files_are_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text('{"my": "own data"}\n')
    (out / "notes.txt").write_text("keep me\n")
    before = _tree(out)
    code, err = run_cli(capsys, "fit", *FAST, "--out", str(out))
    assert code == 2
    line = _one_line(err)
    assert "--out" in line and name in line and "did not write" in line
    assert _tree(out) == before  # not even a lock file


def test_a_directory_rela_train_started_is_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A start that never reached its first checkpoint (its lock file marks the directory as
    rela-train's) may be started again."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text("")
    (out / "config.json").write_text("{}\n")
    code, err = run_cli(capsys, "fit", *FAST, "--out", str(out))
    assert code == 0, err
    assert (out / "summary.json").is_file()


_HOLDER = """
import sys, time
from pathlib import Path
from rela_train.run_directory import RunDirectory
held = RunDirectory.open(Path(sys.argv[1]), new=sys.argv[2] == "new")
print("ready", flush=True)
time.sleep(600)
"""


def _hold(path: Path, new: bool) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), "new" if new else "resume"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "ready"
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.send_signal(signal.SIGKILL)  # the kernel releases the lock even on SIGKILL
    holder.wait(timeout=30)
    holder.stdout.close()


def test_a_second_writer_is_refused_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    holder = _hold(out, new=True)
    try:
        code, err = run_cli(capsys, "fit", *FAST, "--out", str(out))
        assert code == 2
        line = _one_line(err)
        assert "being written by another rela-train run" in line
        assert f"pid {holder.pid} on {socket.gethostname()}" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written
    finally:
        _release(holder)
    code, err = run_cli(capsys, "fit", *FAST, "--out", str(out))
    assert code == 0, err
    holder_record = json.loads((out / LOCK).read_text())
    assert holder_record["pid"] == os.getpid() and holder_record["host"] == socket.gethostname()


def test_resume_is_refused_while_another_process_writes_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, err = run_cli(capsys, "fit", *FAST, "--out", str(out))
    assert code == 0, err
    before = _tree(out)
    holder = _hold(out, new=False)
    try:
        code, err = run_cli(capsys, "fit", "--resume", str(out))
        assert code == 2 and f"pid {holder.pid}" in _one_line(err)
        after = _tree(out)
        assert {k: v for k, v in after.items() if k != LOCK} == {
            k: v for k, v in before.items() if k != LOCK
        }
    finally:
        _release(holder)
    code, err = run_cli(capsys, "fit", "--resume", str(out))
    assert code == 0, err


def test_a_start_that_fails_after_creating_the_directory_removes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new" / "deeper" / "run"
    code, err = run_cli(capsys, "fit", *FAST, "--out", str(out), "--prior", "nope:1")
    assert code == 2 and "unknown prior kind" in _one_line(err)
    assert list(tmp_path.iterdir()) == []  # the parents it made are gone too


def test_a_failed_start_in_an_existing_directory_leaves_it_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    code, err = run_cli(capsys, "fit", *FAST, "--out", str(out), "--prior", "nope:1")
    assert code == 2 and "unknown prior kind" in _one_line(err)
    assert _tree(out) == {"notes.txt": b"keep me\n"}


def test_missing_data_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, err = run_cli(
        capsys, "fit", *FAST, "--out", str(out), "--dataset", "folder",
        "--data-dir", str(tmp_path / "missing"), "--val-dir", str(tmp_path / "missing"),
    )  # fmt: skip
    assert code == 2 and "does not exist" in _one_line(err)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "1"], "--batch-size: must be >= 2 (BatchNorm needs"),
        (["--train-subset", "1"], "no step could be trained"),
        (["--train-subset", "8", "--budget", "0.1"], "an epoch takes 1 of the 8 training images"),
    ],
)
def test_a_run_that_cannot_train_a_step_is_refused_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "run"
    code, err = run_cli(capsys, "fit", *FAST, "--out", str(out), *argv)
    assert code == 2 and message in _one_line(err)
    assert not out.exists()


def test_the_smallest_trainable_run_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, err = run_cli(
        capsys, "fit", *FAST, "--out", str(out), "--train-subset", "2", "--batch-size", "2",
        "--knn-k", "2",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["samples_seen"] == 2


def test_a_run_whose_every_step_was_skipped_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(tmp_path / "val", classes=2, per_class=2, seed=2)
    for k in range(2):
        folder = tmp_path / "train" / f"class_{k}"
        folder.mkdir(parents=True)
        for i in range(4):
            (folder / f"broken_{i}.png").write_bytes(b"not a png at all")
    out = tmp_path / "run"
    code, err = run_cli(capsys, "fit", "--preset", "synthetic-test", "--out", str(out),
        "--dataset", "folder", "--data-dir", str(tmp_path / "train"),
        "--val-dir", str(tmp_path / "val"), "--image-size", "12", "--load-size", "14",
        "--batch-size", "4", "--epochs", "1", "--eval-every", "0", "--probe-epochs", "0",
        "--no-progress", "--threads", "1",
    )  # fmt: skip
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert "no step of epoch 1 could be trained" in last and "8 unreadable images" in last
    assert not (out / "summary.json").exists()
