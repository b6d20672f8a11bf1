"""Trainer smoke runs on a CUDA device: a short `fit` with bf16 autocast and channels_last for
BYOL and for ReLA with each selection policy, `embed` on CUDA against the CPU result, and a run
inside a 1-rank NCCL process group. Skipped with the reason where no device exists."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folder import make_image_folder
from rela_train.cli import main
from rela_train.engine import Hooks, Trainer
from rela_train.presets import get_preset
from rela_train.runs import fit

import rela_kernels as rk

pytestmark = pytest.mark.cuda

HERE = Path(__file__).resolve().parent
ON_CUDA = dict(device="cuda", amp="bf16", channels_last=True)
RELA = dict(prior="pixels:8", budget=0.5, switch="const:0.5")


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _step_devices() -> tuple[Hooks, list[str]]:
    seen: list[str] = []
    return Hooks(on_step_end=lambda trainer: seen.append(trainer.device.type)), seen


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "event" not in r]


@pytest.mark.parametrize("policy", [None, "random", "hard", "easy", "infobatch", "inbatch"])
def test_fit_on_cuda_bf16_channels_last(tmp_path: Path, policy: str | None) -> None:
    changes = dict(ON_CUDA) if policy is None else dict(ON_CUDA, policy=policy, **RELA)
    cfg = get_preset("synthetic-test").replace(**changes)
    hooks, devices = _step_devices()
    result = fit(cfg, tmp_path / "run", hooks=hooks, log=lambda _: None)
    assert result.status == "finished"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(devices) == {"cuda"} and len(devices) == summary["steps"]
    losses = _losses(tmp_path / "run")
    assert losses and all(math.isfinite(x) for x in losses)
    if policy is not None:
        # 256 images, budget 0.5 -> 128 per epoch -> 8 steps of 16 back-propagated images.
        assert summary["steps"] == 16 and summary["switch_step"] == 8
    assert 0.0 <= summary["knn_acc"] <= 1.0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state  # written from CUDA tensors and readable on the host


def test_embed_on_cuda_matches_cpu(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "data", classes=3, per_class=7, seed=3)
    common = ["--prior", "random:resnet10-small", "--input-size", "16", "--workers", "0"]
    common += ["--no-progress", "--batch-size", "8", "--dim", "5", "--data-dir", str(folder)]
    stores = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"store-{device}"
        assert main(["embed", *common, "--out", str(out), "--device", device]) == 0
        stores[device] = np.array(rk.EmbeddingStore.open(out).array, dtype=np.float32)
    cuda, cpu = stores["cuda"], stores["cpu"]
    assert cuda.shape == cpu.shape == (21, 512) and np.isfinite(cuda).all()
    # bf16 autocast on CUDA: rows agree in direction to bf16 accuracy.
    cos = (cuda * cpu).sum(1) / (np.linalg.norm(cuda, axis=1) * np.linalg.norm(cpu, axis=1))
    assert cos.min() > 0.99, cos.min()


def test_fit_in_a_one_rank_nccl_group(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(HERE / "cuda_nccl_worker.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "nccl.json").read_text())
    assert record["backend"] == "nccl" and record["all_reduce"] == 3.0
    assert record["status"] == "finished" and record["steps"] > 0
    assert set(record["devices"]) == {"cuda"}


def test_trainer_places_the_model_on_cuda(tmp_path: Path) -> None:
    cfg = get_preset("synthetic-test").replace(epochs=1, probe_epochs=0, eval_every=0, **ON_CUDA)
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.device.type == "cuda"
    assert trainer.run().status == "finished"
