"""Exported standard ResNet-18/50 backbones load with ``strict=True`` into torchvision and timm,
and their pooled features equal ours (max abs difference <= 1e-5 in fp32).

torchvision and timm do not import next to this machine's CPU-only torch (the index's
torchvision wheels link the CUDA torch libraries), so the loading runs in another interpreter:
this one where both import (a GPU machine's python3), else the side venv of `make interop-venv`
(the CUDA build of torch, which imports without a GPU). Where neither exists the test is
skipped with the reason. The loading script, tests/interop_worker.py, imports neither
rela_kernels nor rela_train: it does what a user of the exported file does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rela_train import cli
from rela_train.checkpoint import load_checkpoint
from rela_train.config import TrainConfig
from rela_train.learner import build_learner
from rela_train.presets import get_preset
from rela_train.runs import fit

# safetensors comes with the [train] extra; a machine without it (a bare GPU image) skips these.
safetensors_torch = pytest.importorskip("safetensors.torch")
load_file, save_file = safetensors_torch.load_file, safetensors_torch.save_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "interop_worker.py"
TOLERANCE = 1e-5

# interop: `make gpu-check` selects it with the CUDA tests.
pytestmark = [pytest.mark.slow, pytest.mark.interop]


def interop_python() -> tuple[str | None, str]:
    """(interpreter where torchvision and timm import, or None; why / which)."""
    if all(importlib.util.find_spec(name) for name in ("torchvision", "timm")):
        return sys.executable, "this interpreter"
    if shutil.which("make") is None:
        return None, "no torchvision/timm here and make not found to locate the interop venv"
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "interop-venv-path"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    paths = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    venv = Path(paths["INTEROP_VENV"])
    python = venv / "bin" / "python"
    if not (venv / ".rela-installed").exists() or not python.exists():
        return None, (
            f"torchvision and timm do not import here and there is no interop venv at {venv}: "
            "run `make interop-venv` once to create it (about 4.8 GB)"
        )
    return str(python), f"the interop venv {venv}"


def small_run(tmp: Path, arch: str, small_images: bool = False) -> Path:
    config: TrainConfig = get_preset("synthetic-test").replace(
        arch=arch, width=64, small_images=small_images, image_size=32, proj_hidden=64,
        train_subset=32, val_subset=16, epochs=1, batch_size=16, probe_epochs=0, eval_every=0,
    )  # fmt: skip
    run = tmp / f"{arch}-{'small' if small_images else 'standard'}"
    assert fit(config, run, log=lambda _: None).status == "finished"
    return run


def our_features(run: Path, x: torch.Tensor) -> torch.Tensor:
    """The run's own online backbone (from its checkpoint, not from the exported file)."""
    state = load_checkpoint(run)
    config = TrainConfig.from_dict(state["config"])
    learner = build_learner(config, state["channels"], len(state["classes"]), None)
    learner.load_state_dict(state["learner"])
    backbone = learner.byol.backbone.eval()
    with torch.no_grad():
        return backbone(x)


def test_exported_resnets_load_strictly_into_torchvision_and_timm(tmp_path: Path) -> None:
    python, where = interop_python()
    if python is None:
        pytest.skip(where)
    runs = {
        "resnet18": small_run(tmp_path, "resnet18"),
        "resnet50": small_run(tmp_path, "resnet50"),
        "resnet18-small": small_run(tmp_path, "resnet18", small_images=True),
    }
    files, models = {}, []
    for name, run in runs.items():
        for fmt in ("safetensors", "pt"):
            out = tmp_path / f"{name}.{fmt}"
            assert cli.main(["export", str(run), "--out", str(out), "--format", fmt]) == 0
            files[name, fmt] = out
    for name, fmt in files:
        arch = name.split("-")[0]
        small = name.endswith("small")
        libraries = ("torchvision-small-stem",) if small else ("torchvision", "timm")
        for library in libraries:
            models.append({"name": f"{name}/{fmt}/{library}", "library": library, "arch": arch,
                           "file": str(files[name, fmt]), "run": name})  # fmt: skip
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, tmp_path / "x.safetensors")
    spec = {"input": str(tmp_path / "x.safetensors"), "out": str(tmp_path / "features.safetensors"),
            "models": models}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of ours imports
    done = subprocess.run(
        [python, str(WORKER), str(tmp_path / "spec.json")],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = load_file(tmp_path / "features.safetensors")
    ours = {name: our_features(run, x) for name, run in runs.items()}
    worst = 0.0
    for model in models:
        got, want = theirs[model["name"]], ours[model["run"]]
        assert got.shape == want.shape == (2, 2048 if model["arch"] == "resnet50" else 512)
        difference = (got - want).abs().max().item()
        assert difference <= TOLERANCE, (model["name"], difference)
        worst = max(worst, difference)
    print(f"interop ({where}, {done.stdout.strip()}): {len(models)} loads, max abs diff {worst}")
