"""Loads exported backbones into torchvision and timm, and writes their pooled features.

Run by ``tests/test_backbone_interop.py`` under an interpreter where torchvision and timm import
(the interop side venv, or a GPU machine's python3), as
``python interop_worker.py SPEC.json``. It imports neither rela_kernels nor rela_train: it is what
a user of the exported file does. SPEC holds ``input`` (a safetensors file with the tensor
``x``), ``out`` (the safetensors file to write) and ``models``: a list of ``{"name", "library",
"arch", "file"}`` where ``library`` is ``torchvision``, ``timm`` or ``torchvision-small-stem``
(torchvision's net with the small-image stem swapped in, as docs/backbone.md shows). Every load
is ``strict=True``; a mismatch fails the run.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def load_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".pt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    return load_file(path)


def build(library: str, arch: str) -> nn.Module:
    if library == "timm":
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=0)  # fc left out
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Identity()  # fc left out: the pooled features come out
    if library == "torchvision-small-stem":
        width = net.conv1.out_channels
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def main() -> None:
    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    torch.set_num_threads(int(spec.get("threads", 1)))
    x = load_file(spec["input"])["x"]
    features = {}
    for model in spec["models"]:
        net = build(model["library"], model["arch"])
        net.load_state_dict(load_state(model["file"]), strict=True)
        net.eval()
        with torch.no_grad():
            features[model["name"]] = net(x).float().contiguous()
    save_file(features, spec["out"])
    versions = {"torch": torch.__version__}
    for name in ("torchvision", "timm"):
        versions[name] = __import__(name).__version__
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
