"""A CPU run keeps the contiguous format where oneDNN's AVX2 kernel corrupts the heap in
channels_last (models/cpu_formats.py): strided 1 x 1 convolutions with fewer than 8 input
channels. On an AVX2-only CPU, single-threaded, the unguarded run aborts within a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rela_train.engine import Trainer
from rela_train.models import build_resnet
from rela_train.models.cpu_formats import MIN_SHORTCUT_CHANNELS, channels_last_hazard
from rela_train.presets import get_preset
from torch import nn


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("arch", "width", "hazard"),
    [
        ("resnet10", 4, "layer2.0.downsample.0"),  # its first shortcut sees 4 channels
        ("resnet18", 7, "layer2.0.downsample.0"),
        ("resnet10", 8, None),
        ("resnet50", 2, None),  # Bottleneck: the first strided shortcut sees 4 x 2 = 8
        ("resnet50", 1, "layer2.0.downsample.0"),
    ],
)
def test_the_hazard_is_a_narrow_strided_shortcut(arch: str, width: int, hazard: str | None) -> None:
    with torch.device("meta"):
        found = channels_last_hazard(build_resnet(arch, small_images=True, width=width))
    if hazard is None:
        assert found is None
    else:
        assert found is not None and found.startswith(f"{hazard} is a strided 1x1 convolution")
    # Only strided 1 x 1 convolutions count.
    unstrided = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, stride=2))
    assert channels_last_hazard(unstrided) is None
    wide = nn.Conv2d(MIN_SHORTCUT_CHANNELS, 16, 1, stride=2)
    assert channels_last_hazard(wide) is None
    assert channels_last_hazard(nn.Conv2d(MIN_SHORTCUT_CHANNELS - 1, 16, 1, stride=2))


@pytest.mark.parametrize(("width", "kept"), [(4, False), (8, True)])
def test_a_cpu_run_drops_channels_last_only_for_a_narrow_network(
    tmp_path: Path, width: int, kept: bool
) -> None:
    config = get_preset("synthetic-test").replace(
        width=width, channels_last=True, threads=1, epochs=1, eval_every=0, probe_epochs=0
    )
    messages: list[str] = []
    trainer = Trainer(config, tmp_path / "run", log=messages.append)
    assert trainer.channels_last is kept
    warned = [m for m in messages if m.startswith("warning: --channels-last")]
    assert len(warned) == (0 if kept else 1)
    # The run trains (single-threaded, where the unguarded kernel aborts on AVX2-only CPUs).
    assert trainer.run().status == "finished"
    weight = trainer.learner.byol.backbone.layer2[0].conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is kept
