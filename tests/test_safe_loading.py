"""No file a user hands the trainer runs code: a crafted checkpoint is refused without running
its payload, real checkpoints (as written by the trainer) load with ``weights_only=True`` and
resume, and no source file loads a pickle unsafely."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from rela_train import cli
from rela_train.checkpoint import FORMAT, load_checkpoint
from rela_train.engine import Hooks
from rela_train.presets import get_preset
from rela_train.runs import fit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: proof that the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted(path: Path, marker: Path, how: str) -> Path:
    state = {"format": FORMAT, "config": {}, "payload": _Payload(marker)}
    if how == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(state, handle)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _one_line_refusal(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "not a safe, valid rela-train checkpoint" in lines[0] and "Traceback" not in err
    assert "weights_only=False" not in err  # never advise the unsafe load


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_eval_refuses_a_crafted_checkpoint_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    marker = tmp_path / "payload-ran"
    evil = _crafted(tmp_path / "evil.pt", marker, how)
    # The payload really runs when unpickled unsafely (so the test can fail).
    if how == "torch.save":
        torch.load(evil, weights_only=False)
    else:
        pickle.loads(evil.read_bytes())
    assert marker.exists()
    marker.unlink()
    code, err = run_cli(capsys, "eval", str(evil))
    assert code == 2
    _one_line_refusal(err)
    assert not marker.exists()


def test_resume_refuses_a_crafted_checkpoint_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(get_preset("synthetic-test").to_json())
    marker = tmp_path / "payload-ran"
    _crafted(run / "checkpoints" / "last.pt", marker, "torch.save")
    code, err = run_cli(capsys, "fit", "--resume", str(run))
    assert code == 2
    _one_line_refusal(err)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x01 not a checkpoint at all", "valid rela-train checkpoint"),
        (b"PK\x03\x04 a damaged zip", "not a valid rela-train checkpoint"),
        (None, "not a valid rela-train checkpoint (no rela-train-checkpoint-v1 marker)"),
        ({"format": FORMAT, "config": {}}, "not a valid rela-train checkpoint (missing"),
    ],
)
def test_damaged_or_foreign_checkpoints_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content, message: str
) -> None:
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save({"weights": torch.zeros(2)} if content is None else content, path)
    code, err = run_cli(capsys, "eval", str(path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_of_the_current_format_loads_safely_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trainer's checkpoints hold only tensors and plain values: they load with
    ``weights_only=True`` and a stopped run resumes to the end from one."""
    cfg = get_preset("synthetic-test").replace(
        prior="pixels:8", budget=0.5, policy="infobatch", switch="adaptive", threads=1,
        optimizer="lars", epochs=2, eval_every=0, probe_epochs=0, progress=False,
    )  # fmt: skip

    def stop(trainer) -> None:
        if trainer.counters.global_step == 3:
            trainer.request_stop()

    run = tmp_path / "run"
    result = fit(cfg, run, hooks=Hooks(on_step_end=stop), log=lambda _: None)
    assert result.status == "interrupted"
    raw = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and raw["counters"]["global_step"] == 3
    assert load_checkpoint(run)["counters"]["global_step"] == 3
    code, err = run_cli(capsys, "fit", "--resume", str(run))
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 * 8  # 256 images x 0.5 / 16 per step, 2 epochs


def _calls(pattern: str) -> list[tuple[Path, int, str]]:
    found = []
    for folder in ("rela_kernels", "python", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(pattern, line):
                    found.append((path.relative_to(ROOT), number, line.strip()))
    return found


def _statement(path: Path, number: int) -> str:
    """The call starting on line ``number`` up to its closing parenthesis."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()[number - 1 :]
    text, depth = "", 0
    for line in lines:
        text += line
        depth += line.count("(") - line.count(")")
        if depth <= 0 and "(" in text:
            break
    return text


def test_no_source_file_unpickles_unsafely() -> None:
    loads = _calls(r"torch\.load\(")
    assert loads, "the scan found no torch.load at all: it is not looking at the sources"
    for path, number, _ in loads:
        assert "weights_only=True" in _statement(path, number), f"{path}:{number}"
    for path, number, line in _calls(r"\bpickle\.loads?\(|\bUnpickler\(|allow_pickle\s*=\s*True"):
        pytest.fail(f"{path}:{number} unpickles: {line}")
    for path, number, _ in _calls(r"\bnp\.load\("):
        assert "allow_pickle=False" in _statement(path, number), f"{path}:{number}"


def test_the_torchscript_prior_says_it_runs_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "torchscript:PATH prior runs the archive's code" in help_text


def test_payload_class_is_not_importable_by_the_safe_loader(tmp_path: Path) -> None:
    """Sanity of the fixture: the safe loader itself refuses the payload (and does not run it)."""
    marker = tmp_path / "ran"
    evil = _crafted(tmp_path / "evil.pt", marker, "torch.save")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    assert not marker.exists() and os.path.getsize(evil) > 0
