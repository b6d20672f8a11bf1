"""Backend availability and selection."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch

import rela_kernels as rk
from rela_kernels import backends


def test_available_reports_every_backend_with_a_reason():
    status = backends.available()
    assert set(status) == set(backends.BACKENDS)
    assert status["reference"].usable
    for entry in status.values():
        assert entry.reason
    # CI builds the C++ extension: its absence must be loud, not a silent reference fallback.
    assert status["cpu"].usable, status["cpu"].reason
    if not torch.cuda.is_available():
        assert not status["cuda"].usable


def test_auto_picks_the_cpu_kernels_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("RELA_BACKEND", raising=False)
    assert backends.resolve("transported_cosine_loss", torch.device("cpu")) == "cpu"


def test_environment_forces_and_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("RELA_BACKEND", "reference")
    assert backends.resolve("transport", torch.device("cpu")) == "reference"
    assert backends.resolve("transport", torch.device("cpu"), "cpu") == "cpu"
    monkeypatch.setenv("RELA_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("transport", torch.device("cpu"))


def test_forced_backend_on_the_wrong_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' is not usable here|cannot run on cpu"):
        backends.resolve("transport", torch.device("cpu"), "triton")


def test_fallback_to_reference_warns_once(monkeypatch):
    unusable = backends.Availability(False, "pretend the extension is missing")
    status = dict(backends.available(), cpu=unusable)
    monkeypatch.setattr(backends, "available", lambda: status)
    monkeypatch.setattr(backends, "_warned_fallback", set())
    monkeypatch.delenv("RELA_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="pretend the extension is missing"):
        assert backends.resolve("cosine_loss", torch.device("cpu")) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("cosine_loss", torch.device("cpu")) == "reference"
    z = torch.randn(3, 4)
    torch.testing.assert_close(rk.cosine_loss(z, z), torch.zeros(3), atol=1e-6, rtol=0)


def test_only_conftest_turns_the_triton_interpreter_on():
    # A module-level assignment in one test file leaks into every test collected after it in the
    # process, and into the child processes: on a GPU machine, torch.compile's kernels and the
    # NCCL worker's ran interpreted on CUDA tensors and failed. tests/conftest.py decides alone.
    assignment = re.compile(r"environ(\.setdefault\(|\[)\s*[\"']TRITON_INTERPRET")
    tests = Path(__file__).resolve().parent
    offenders = [
        path.name
        for path in sorted(tests.glob("*.py"))
        if path.name != "conftest.py" and assignment.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == [], f"set TRITON_INTERPRET outside conftest.py: {offenders}"


def test_available_is_a_fresh_dict_that_follows_the_interpreter_flag(monkeypatch) -> None:
    first = backends.available()
    first["cpu"] = backends.Availability(False, "changed by the caller")
    assert backends.available()["cpu"].reason != "changed by the caller"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    without = backends.available()["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with_flag = backends.available()["triton"]
    if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        assert not without.usable and with_flag.usable
