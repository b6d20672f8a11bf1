"""Backbone files: reading and writing a ResNet's bare state dict, and checking it against a net.

A backbone file holds the tensors of one ResNet under torchvision's key layout (``conv1.weight``,
``layer1.0.bn1.running_mean``, ...) and nothing else: no classifier, projector or wrapper
prefix. Two formats are written and read:

* ``safetensors`` (the default): a header of names, shapes and dtypes, then the raw bytes;
  loading it never runs code.
* ``pt``: ``torch.save`` of the plain ``{name: tensor}`` dict, read back with
  ``torch.load(weights_only=True)``: a file whose pickle holds anything but tensors and plain
  containers is refused, never unpickled.

What net a state dict is follows from its keys and shapes alone (:func:`infer_resnet`), so a
torchvision ImageNet weights file evaluates and initialises a run like one of ours.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rela_train.models import RESNET_ARCHS, build_resnet

__all__ = [
    "FORMATS",
    "TORCHVISION_ARCHS",
    "BackboneSpec",
    "backbone_state",
    "check_state_matches",
    "infer_resnet",
    "load_backbone_file",
    "load_into",
    "load_weights_only",
    "serialise_backbone",
    "torchvision_incompatibility",
]

FORMATS = ("safetensors", "pt")
# The archs whose standard-stem, width-64 form is the torchvision (and timm) model of that name.
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Prefixes that wrappers put before a module's own keys: DistributedDataParallel, torch.compile,
# and where our checkpoints keep the online backbone.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
CLASSIFIER_PREFIX = "fc."


@dataclass(frozen=True)
class BackboneSpec:
    """What ResNet a state dict belongs to (the arguments of :func:`build_resnet`)."""

    arch: str
    width: int
    small_images: bool
    in_channels: int

    @property
    def stem(self) -> str:
        return "small" if self.small_images else "standard"

    def build(self) -> nn.Module:
        return build_resnet(
            self.arch,
            small_images=self.small_images,
            width=self.width,
            in_channels=self.in_channels,
        )


def torchvision_incompatibility(spec: BackboneSpec) -> str | None:
    """None when ``spec`` is the torchvision/timm model of its name, else why not (one phrase)."""
    reasons = []
    if spec.arch not in TORCHVISION_ARCHS:
        reasons.append(f"{spec.arch} has no torchvision counterpart")
    if spec.small_images:
        reasons.append("the small-image stem (3x3/1 convolution, no max-pool) is not torchvision's")
    if spec.width != 64:
        reasons.append(f"width {spec.width} is not torchvision's 64")
    if spec.in_channels != 3:
        reasons.append(f"{spec.in_channels} input channels, not 3")
    return "; ".join(reasons) or None


def backbone_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` under ``prefix`` (e.g. ``byol.backbone.``), the prefix and any
    wrapper prefix (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``) removed from the keys,
    as contiguous CPU tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        bare = _strip_wrappers(key)
        if not bare.startswith(prefix):
            continue
        out[_strip_wrappers(bare[len(prefix) :])] = value.detach().cpu().contiguous()
    if not out:
        raise ValueError(f"no tensors under {prefix!r} in the checkpoint's model")
    return out


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for wrapper in WRAPPER_PREFIXES:
            if key.startswith(wrapper):
                key, changed = key[len(wrapper) :], True
    return key.replace("._orig_mod.", ".").replace(".module.", ".")


def serialise_backbone(
    state: Mapping[str, torch.Tensor], fmt: str, metadata: Mapping[str, str]
) -> bytes:
    """The bytes of a backbone file of format ``fmt`` (``safetensors`` or ``pt``)."""
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(tensors, metadata=dict(metadata))
    if fmt == "pt":
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        return buffer.getvalue()
    raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def load_backbone_file(path: str | os.PathLike[str], flag: str) -> dict[str, torch.Tensor]:
    """The ``{key: tensor}`` dict of a backbone file (safetensors, or a weights-only ``.pt``).

    Wrapper prefixes (``module.``, ``_orig_mod.``) are removed and a classifier (``fc.*``) is
    dropped. A ``.pt`` is read with ``torch.load(weights_only=True)``: a pickle holding anything
    but tensors is refused without running it. ``flag`` names the argument in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no backbone file at {path}")
    with path.open("rb") as handle:
        head = handle.read(8)
    if _looks_like_safetensors(path, head):
        state = _load_safetensors(path, flag)
    else:
        state = _load_weights_only(path, flag)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        bare = _strip_wrappers(key)
        if bare.startswith(CLASSIFIER_PREFIX):
            continue
        out[bare] = value
    if not out:
        raise ValueError(
            f"{flag}: expected backbone tensors, got none in {path} (only fc.*, or none)"
        )
    return out


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    # A safetensors file starts with the little-endian length of its JSON header, then "{".
    if len(head) < 8:
        return False
    size = int.from_bytes(head, "little")
    if not 2 <= size <= path.stat().st_size - 8:
        return False
    with path.open("rb") as handle:
        handle.seek(8)
        return handle.read(1) == b"{"


def _load_safetensors(path: Path, flag: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{flag}: expected a valid safetensors file, got {path} ({_first_line(error)})"
        ) from error


def load_weights_only(path: Path, *, refused: str, invalid: Callable[[Exception], str]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, the one way files are unpickled here:
    a file the weights-only unpickler refuses raises ValueError(``refused``), any other failure
    (a damaged or foreign file) ValueError(``invalid(error)``)."""
    try:
        with warnings.catch_warnings():
            # The weights-only unpickler warns about pickle protocols before refusing them.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests turning the weights-only guard off, which would run the
        # file's code: it is not passed on.
        raise ValueError(refused) from error
    except Exception as error:  # zip/pickle errors of a damaged or foreign file
        raise ValueError(invalid(error)) from error


def _load_weights_only(path: Path, flag: str) -> dict[str, torch.Tensor]:
    state = load_weights_only(
        path,
        refused=f"{flag}: expected a state dict of tensors only, got {path}, which the "
        "weights-only loader refuses (a pickle payload of other objects, or a damaged file); "
        "refused without unpickling it",
        invalid=lambda error: (
            f"{flag}: expected a safetensors file or a weights-only torch "
            f"state dict, got {path} ({type(error).__name__}: {_first_line(error)})"
        ),
    )
    if not isinstance(state, dict):
        raise ValueError(
            f"{flag}: expected a state dict (a dict of tensors) in {path}, got "
            f"{type(state).__name__}"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{flag}: expected a flat dict of tensors in {path}, got "
                f"{type(value).__name__} under key {key!r}"
            )
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.")


def infer_resnet(state: Mapping[str, torch.Tensor], flag: str) -> BackboneSpec:
    """The :class:`BackboneSpec` whose net has exactly the keys and shapes of ``state``
    (checked by :func:`check_state_matches`); a one-line error naming ``flag`` otherwise."""
    stem = state.get("conv1.weight")
    if stem is None or stem.dim() != 4:
        raise ValueError(
            f"{flag}: expected a ResNet state dict (with a 4-d conv1.weight), got keys starting "
            f"with {next(iter(state), None)!r}"
        )
    width, in_channels, kernel = int(stem.shape[0]), int(stem.shape[1]), int(stem.shape[-1])
    if kernel not in (3, 7):
        raise ValueError(
            f"{flag}: conv1.weight has a {kernel}x{kernel} kernel, expected 7x7 (standard stem) "
            f"or 3x3 (small-image stem); got shape {tuple(stem.shape)}"
        )
    blocks = [0, 0, 0, 0]
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, index = int(match.group(1)) - 1, int(match.group(2))
            blocks[stage] = max(blocks[stage], index + 1)
    bottleneck = "layer1.0.conv3.weight" in state
    for arch, (block, layers) in RESNET_ARCHS.items():
        if tuple(blocks) == tuple(layers) and (block.expansion == 4) == bottleneck:
            spec = BackboneSpec(arch, width, kernel == 3, in_channels)
            # Shapes only: nothing is allocated, and the global generator is left as it was.
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                check_state_matches(spec.build(), state, flag)
            return spec
    raise ValueError(
        f"{flag}: expected one of {', '.join(RESNET_ARCHS)}, got {blocks} "
        f"{'bottleneck' if bottleneck else 'basic'} blocks per stage"
    )


def check_state_matches(module: nn.Module, state: Mapping[str, torch.Tensor], flag: str) -> None:
    """Raise a one-line ValueError naming the first key where ``state`` and ``module``'s state
    dict differ (missing, foreign, or of another shape), with both shapes."""
    expected = module.state_dict()
    for key in sorted(set(expected) | set(state), key=_key_order(expected)):
        want, got = expected.get(key), state.get(key)
        if want is None:
            raise ValueError(
                f"{flag}: expected only the backbone's keys, got the foreign key {key!r} "
                f"(shape {tuple(got.shape)})"
            )
        if got is None:
            raise ValueError(
                f"{flag}: expected key {key!r} of shape {tuple(want.shape)}, got a file without it"
            )
        if tuple(want.shape) != tuple(got.shape):
            raise ValueError(
                f"{flag}: expected key {key!r} of shape {tuple(want.shape)} (the backbone's), got "
                f"shape {tuple(got.shape)} in the file"
            )


def _key_order(expected: Mapping[str, torch.Tensor]):
    positions = {key: index for index, key in enumerate(expected)}
    return lambda key: (positions.get(key, len(positions)), key)


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], flag: str) -> None:
    """Copy ``state`` into ``module`` after :func:`check_state_matches` (values keep the
    module's dtype, device and memory format)."""
    check_state_matches(module, state, flag)
    with torch.no_grad():
        module.load_state_dict(dict(state), strict=True)
