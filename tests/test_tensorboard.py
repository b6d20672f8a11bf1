"""`rela-train fit --tensorboard [DIR]`: the scalars read back with TensorBoard's own reader equal
metrics.jsonl, a resumed run writes no step twice, and the flag's errors are one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rela_train import cli
from rela_train.engine import Hooks, Trainer
from rela_train.presets import get_preset
from rela_train.runs import fit


def needs_tensorboard():
    """TensorBoard is an optional dependency (`make test` installs it)."""
    return pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


# metrics.jsonl keys and the tags they must appear under (the spec, written out independently).
STEP_KEYS = {
    "loss": "train/loss",
    "rho": "train/rho",
    "lr": "train/lr",
    "tau": "train/tau",
    "img_per_s": "train/images_per_s",
    "samples_seen": "train/samples_seen",
    "probe_loss": "train/probe_loss",
    "probe_acc": "train/probe_acc",
}
EVAL_KEYS = {
    "knn_acc": "eval/knn_acc",
    "linear_acc": "eval/linear_acc",
}


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(**changes):
    return get_preset("synthetic-test").replace(**changes)


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    events = needs_tensorboard().EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def expected_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What metrics.jsonl says TensorBoard must hold, as float32 (TensorBoard's precision)."""
    expected: dict[str, list[tuple[int, float]]] = {}

    def add(tag: str, step: int, value) -> None:
        if value is not None:
            expected.setdefault(tag, []).append((step, float(np.float32(value))))

    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" not in record:
            for key, tag in STEP_KEYS.items():
                add(tag, record["step"], record[key])
            add("train/phase", record["step"], {"rela": 0, "byol": 1}[record["phase"]])
        elif record["event"] == "final":
            # The curve's last point is the bank kNN like the others; the whole training set's
            # kNN has its own tag.
            bank = record["knn_acc_bank"]
            add("eval/knn_acc", record["step"], record["knn_acc"] if bank is None else bank)
            add("eval/knn_acc_full", record["step"], record["knn_acc"])
            add("eval/linear_acc", record["step"], record.get("linear_acc"))
        else:
            for key, tag in EVAL_KEYS.items():
                add(tag, record["step"], record.get(key))
    return expected


def test_scalars_equal_metrics_jsonl(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Two epochs, switch after the first: both phases, a kNN evaluation per epoch, the final
    # probe. The adaptive rule's rho is logged by a second run below.
    fit(config(prior="pixels:8", switch="const:0.5", tensorboard="tb"), run, log=lambda _: None)
    got = read_scalars(run / "tb")
    want = expected_scalars(run)
    assert "train/rho" not in want  # const switch: no rho; the adaptive run covers it
    assert set(want) >= {"train/loss", "train/phase", "eval/knn_acc", "eval/linear_acc"}
    assert got == want
    phases = [value for _, value in got["train/phase"]]
    assert phases == [0.0] * 16 + [1.0] * 16
    assert [step for step, _ in got["eval/knn_acc"]] == [16, 32]  # epoch 1, then the final

    adaptive = tmp_path / "adaptive"
    cfg = config(prior="pixels:8", epochs=1, eval_bank=100, tensorboard=str(tmp_path / "abs"))
    result = fit(cfg, adaptive, log=lambda _: None)
    got = read_scalars(tmp_path / "abs")  # an absolute DIR is used as given
    assert len(got["train/rho"]) == 16
    assert got == expected_scalars(adaptive)
    # With a bank smaller than the training set the two final kNN figures differ: the curve
    # ends on the bank's, the whole set's has its own tag.
    summary = result.summary
    assert summary["knn_acc_bank"] is not None
    assert got["eval/knn_acc"][-1] == (16, float(np.float32(summary["knn_acc_bank"])))
    assert got["eval/knn_acc_full"] == [(16, float(np.float32(summary["knn_acc"])))]


class Crash(RuntimeError):
    pass


def test_resume_writes_no_step_twice(tmp_path: Path) -> None:
    cfg = config(prior="pixels:8", budget=0.5, policy="infobatch", switch="const:0.5",
                 tensorboard="tb")  # fmt: skip
    full = tmp_path / "full"
    fit(cfg, full, log=lambda _: None)

    def crash(trainer: Trainer) -> None:
        # Steps 9-11 reach TensorBoard, but the checkpoint is the one after epoch 1 (step 8):
        # what a killed process leaves behind.
        if trainer.counters.global_step == 11:
            raise Crash

    run = tmp_path / "resumed"
    with pytest.raises(Crash):
        fit(cfg, run, hooks=Hooks(on_step_end=crash), log=lambda _: None)
    written = read_scalars(run / "tb")
    assert [s for s, _ in written["train/loss"]] == list(range(1, 12))
    assert fit(cfg, run, resume=True, log=lambda _: None).status == "finished"
    got = read_scalars(run / "tb")
    for tag, points in got.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), tag  # each step once, in order
    loss = dict(read_scalars(full / "tb")["train/loss"])
    assert dict(got["train/loss"]) == loss  # the replayed steps, not the crashed process's
    assert got == expected_scalars(run)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def assert_one_line_refusal(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rela-train fit: error: --tensorboard"), err
    for needle in needles:
        assert needle in lines[0], err


def test_missing_tensorboard_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    out = tmp_path / "runs" / "r"
    code, err = run_cli(capsys, "fit", "--preset", "synthetic-test", "--out", str(out),
                        "--tensorboard")  # fmt: skip
    assert_one_line_refusal(code, err, "pip install 'rela-kernels[tensorboard]'")
    assert not (tmp_path / "runs").exists()


def test_unwritable_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needs_tensorboard()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    out = tmp_path / "runs" / "r"
    code, err = run_cli(capsys, "fit", "--preset", "synthetic-test", "--out", str(out),
                        "--tensorboard", str(blocker / "tb"))  # fmt: skip
    assert_one_line_refusal(code, err, str(blocker / "tb"), "not a directory")
    assert not (tmp_path / "runs").exists()


def test_a_directory_with_another_runs_events_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    needs_tensorboard()
    tb = tmp_path / "tb"
    fit(config(epochs=1, eval_every=0, tensorboard=str(tb)), tmp_path / "first",
        log=lambda _: None)  # fmt: skip
    out = tmp_path / "runs" / "second"
    code, err = run_cli(capsys, "fit", "--preset", "synthetic-test", "--out", str(out),
                        "--tensorboard", str(tb))  # fmt: skip
    assert_one_line_refusal(code, err, str(tb), "another run")
    assert not (tmp_path / "runs").exists()
