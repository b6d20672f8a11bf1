"""Preemption and requeue: ``fit --out DIR --resume auto`` serves the first start and every
requeue; SIGUSR1 (a cluster's preemption notice) checkpoints at the next step boundary and exits
with ``REQUEUE``; a wrapper that reruns the same command on that status ends with the result of
an uninterrupted run. Bad uses of ``--resume auto`` are one-line errors."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rela_train import cli
from rela_train.engine import TIME_FIELDS
from rela_train.stop import REQUEUE

import rela_kernels as rk

# What an sbatch script does around `srun rela-train fit ... --resume auto` (docs/cluster.md):
# run the command, and run it again while it exits with the requeue status.
WRAPPER = f"""#!/bin/sh
while :; do
  "$@"
  status=$?
  [ "$status" -eq {REQUEUE} ] || exit "$status"
  echo "wrapper: requeued" >&2
done
"""
# 2 epochs of 32 steps (256 images, batch 8).
FLAGS = ["--preset", "synthetic-test", "--batch-size", "8", "--prior", "pixels:8",
         "--switch", "const:0.5", "--probe-epochs", "5", "--threads", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def records(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        for name in (*TIME_FIELDS, "run_dir"):
            line.pop(name, None)
    return lines


def _step_lines(run: Path) -> int:
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return sum('"event"' not in line for line in text.splitlines())


def test_sigusr1_then_requeue_ends_as_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = tmp_path / "reference"
    code, err = run_cli(capsys, "fit", *FLAGS, "--out", str(reference))
    assert code == 0, err
    wrapper = tmp_path / "requeue.sh"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    run = tmp_path / "run"
    command = [str(wrapper), sys.executable, "-m", "rela_train", "fit", *FLAGS,
               "--out", str(run), "--resume", "auto"]  # fmt: skip
    log = tmp_path / "log.txt"
    with open(log, "w") as output:
        job = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while _step_lines(run) < 3 and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            # The preemption notice goes to the trainer, as srun delivers it to the job's tasks.
            holder = json.loads((run / "rela-train.lock").read_text())
            os.kill(holder["pid"], signal.SIGUSR1)
            assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            if job.poll() is None:
                job.kill()
    text = log.read_text()
    assert text.count("wrapper: requeued") == 1, text
    stopped = re.search(r"stopped by SIGUSR1 at epoch (\d+), step (\d+)", text)
    assert stopped is not None, text
    assert int(stopped[2]) > 0  # mid-epoch
    assert "resuming" in text
    assert records(run) == records(reference)
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    assert summary["knn_acc"] == expected["knn_acc"]
    assert summary["linear_acc"] == expected["linear_acc"]


def test_resume_auto_starts_resumes_and_leaves_a_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    flags = ["fit", "--preset", "synthetic-test", "--epochs", "1", "--probe-epochs", "2",
             "--out", str(run), "--resume", "auto"]  # fmt: skip
    code, err = run_cli(capsys, *flags)  # nothing there yet: a new run
    assert code == 0, err
    summary = (run / "summary.json").read_text()
    code, err = run_cli(capsys, *flags)  # finished: nothing to train, nothing rewritten
    assert code == 0, err
    assert "finished run" in err
    assert (run / "summary.json").read_text() == summary
    # Another command for the same directory is refused, naming what differs.
    code, err = run_cli(capsys, *flags, "--lr", "0.1", "--seed", "3")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("rela-train fit: error: --resume:")
    assert "--lr: 0.5 vs 0.1" in last and "--seed: 0 vs 3" in last, last
    # Settings that cannot change the results may differ.
    code, err = run_cli(capsys, *flags, "--no-progress", "--checkpoint-every", "30m")
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resume", "auto"], "--resume auto: needs --out DIR"),
        (["--resume", "auto", "--out", "{foreign}"], "--resume auto: {foreign} holds config.json"),
        (["--checkpoint-every", "0"], "--checkpoint-every: expected a number of optimizer steps"),
        (["--checkpoint-every", "soon"], "got 'soon'"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints: must be >= 1, got 0"),
    ],
)
def test_bad_uses_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")  # another program's file
    argv = [a.format(foreign=foreign) for a in argv]
    code, err = run_cli(capsys, "fit", "--preset", "synthetic-test", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message.format(foreign=foreign) in lines[0], err
    assert (foreign / "config.json").read_text() == "{}"
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]


def signal_after_the_first_chunk(monkeypatch: pytest.MonkeyPatch, signum: int) -> Any:
    """Make the embedding loop send ``signum`` to this process once its first chunk is durable
    (a preemption notice mid-embedding); returns the real loop, to put back."""
    from rela_train.prior import embedding

    write_embeddings = embedding.write_embeddings

    def preempted_after_a_chunk(store, chunks, write, *rest):  # type: ignore[no-untyped-def]
        def write_then_signal(*args, **kwargs):  # type: ignore[no-untyped-def]
            write(*args, **kwargs)
            os.kill(os.getpid(), signum)

        write_embeddings(store, chunks, write_then_signal, *rest)

    monkeypatch.setattr(embedding, "write_embeddings", preempted_after_a_chunk)
    return write_embeddings


def test_sigusr1_while_the_prior_embeds_requeues_and_keeps_the_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rela_train.prior import embedding, targets

    # Chunks of 128 rows (two for the 256 images), the same for every run of this test.
    small_chunks = functools.partial(embedding.embed_tensors, batch_size=16)
    monkeypatch.setattr(targets, "embed_tensors", small_chunks)
    reference = tmp_path / "reference"
    code, err = run_cli(capsys, "fit", *FLAGS, "--out", str(reference))
    assert code == 0, err

    write_embeddings = signal_after_the_first_chunk(monkeypatch, signal.SIGUSR1)
    handler = signal.getsignal(signal.SIGUSR1)
    run = tmp_path / "run"
    argv = ["fit", *FLAGS, "--out", str(run), "--resume", "auto"]
    code, err = run_cli(capsys, *argv)
    assert code == REQUEUE, err
    assert "stopped by SIGUSR1 while the run was starting" in err, err
    assert signal.getsignal(signal.SIGUSR1) == handler  # restored
    store = rk.EmbeddingStore.open(run / "prior")
    assert store.chunk_count == 2 and store.rows_done == 128 and not store.complete
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    # The requeued command embeds only the missing chunk and ends as the uninterrupted run.
    monkeypatch.setattr(embedding, "write_embeddings", write_embeddings)
    code, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert records(run) == records(reference)
    assert (run / "prior" / "embeddings.f16").read_bytes() == (
        reference / "prior" / "embeddings.f16"
    ).read_bytes()


def test_sigterm_stops_embed_at_once_with_the_requeue_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image
    from rela_train.prior import embedding

    folder = tmp_path / "images"
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 10, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):
        (folder / f"c{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"c{index % 2}" / f"{index}.png")
    write_embeddings = signal_after_the_first_chunk(monkeypatch, signal.SIGTERM)
    out = tmp_path / "store"
    argv = ["embed", "--data-dir", str(folder), "--prior", "pixels:8", "--out", str(out),
            "--chunk-rows", "4", "--workers", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    code, err = run_cli(capsys, *argv)
    assert code == REQUEUE, err
    assert err.strip().splitlines()[-1].startswith("rela-train embed: stopped by SIGTERM"), err
    store = rk.EmbeddingStore.open(out)
    assert store.rows_done == 4 and not store.complete
    monkeypatch.setattr(embedding, "write_embeddings", write_embeddings)
    code, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert rk.EmbeddingStore.open(out).complete
