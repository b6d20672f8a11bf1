"""The scripts in examples/ run end to end at their tiny size on synthetic data (so the tests do
not depend on Fashion-MNIST being installed), and refuse a missing data directory in one line."""

from __future__ import annotations

import importlib
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = ("rela_in_your_loop.py", "supervised_selection.py", "lightning_rela.py")
TINY = ["--tiny", "--synthetic", "--threads", "1"]


@pytest.fixture()
def example(monkeypatch: pytest.MonkeyPatch):
    """Import an example as its script would run (examples/ first on sys.path)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    threads = torch.get_num_threads()

    def load(name: str):
        return importlib.import_module(name)

    yield load
    torch.set_num_threads(threads)
    for name in ("example_utils", *(s.removesuffix(".py") for s in SCRIPTS)):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_example_opens_with_what_it_shows(script: str) -> None:
    text = (EXAMPLES / script).read_text()
    assert text.startswith('"""'), script
    header = text.split('"""')[1]
    assert f"python examples/{script} --tiny" in header
    assert f"python examples/{script} --full" in header


def test_rela_in_your_loop(example, capsys: pytest.CaptureFixture[str]) -> None:
    result = example("rela_in_your_loop").main(TINY)
    out = capsys.readouterr().out
    assert "data: synthetic" in out and "kNN accuracy" in out
    # 4,096 images at 50% per epoch, 4 epochs of whole 64-image batches.
    assert result["samples"] == 4 * (2048 // 64) * 64
    assert result["knn"] > result["untrained_knn"]  # ReLA taught the features something
    # 128 steps are far too few for the ReLA loss to plateau: rk.AdaptiveSwitch watched and waited.
    assert result["switch_step"] is None and 0.0 < result["rho"] < 0.995
    assert "rho" in out


def test_supervised_selection(example, capsys: pytest.CaptureFixture[str]) -> None:
    results = example("supervised_selection").main(TINY)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # the header and one row per method
    full, infobatch, inbatch = (results[m][0] for m in ("full", "infobatch", "inbatch"))
    assert full["backprop"] == 3 * (4096 // 128) * 128
    # InfoBatch at budget 0.5, 3 epochs (no annealed epoch at 3 x 0.125 < 1): half the data.
    assert infobatch["backprop"] == 3 * (2048 // 128) * 128
    assert inbatch["backprop"] == full["backprop"] // 2  # half of every scored batch
    assert inbatch["forward"] == full["backprop"] + inbatch["backprop"]
    for run in (full, infobatch, inbatch):
        assert run["acc"] > 0.2  # 10 classes: chance is 0.1


def test_lightning_example(example, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lightning")
    result = example("lightning_rela").main(TINY)
    assert math.isfinite(result["loss"]) and result["loss"] < 1.0
    assert result["sampler_epoch"] == 1  # Lightning drew a new subset for the second epoch
    assert result["knn"] > 0.3


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_missing_data_directory_is_one_line(script: str, tmp_path: Path) -> None:
    if script == "lightning_rela.py":
        pytest.importorskip("lightning")
    missing = tmp_path / "no-such-dir"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--tiny", "--data-dir", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{script}: error: --data-dir") and str(missing) in lines[0]


def test_examples_use_only_the_public_engine() -> None:
    """The examples are what other people's code looks like: no trainer, no private module."""
    forbidden = re.compile(r"^\s*(from|import)\s+(rela_train\b|rela_kernels\._)", re.MULTILINE)
    offenders = [p.name for p in EXAMPLES.glob("*.py") if forbidden.search(p.read_text())]
    assert offenders == []
