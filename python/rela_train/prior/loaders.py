"""Prior models: frozen networks (or precomputed embeddings) that ReLA-D turns into targets.

A prior is chosen by a spec string:

==================================  =============================================================
``torchscript:PATH``                a TorchScript archive; ``encode_image`` is called when it has
                                    one (OpenAI CLIP archives), ``forward`` otherwise
``checkpoint:ARCH:PATH``            a state dict of one of our ResNets (torchvision key names
                                    load as they are; ``fc.*`` is dropped, the pooled features
                                    are the embedding); the stem and width are read from it
``random:ARCH[:SEED]``              a randomly initialised ResNet, the paper's "Rand" prior
                                    (seed 0 unless given)
``pixels[:SIZE]``                   raw RGB pixels at SIZE x SIZE (16 unless given), in [0, 1]:
                                    a free prior whose PCA whitening the transport does
``embeddings:PATH``                 precomputed ``.npy`` / ``.pt`` embeddings, one row per image
                                    in dataset order
``timm:NAME[:WEIGHTS]``             a timm model, with weights from WEIGHTS or the local cache
``open_clip:ARCH:PRETRAINED``       an OpenCLIP image tower; PRETRAINED is a local file or a tag
                                    whose weights are already cached
==================================  =============================================================

ARCH is ``resnet10/18/34/50/101/152``; for ``random:`` an ``-small`` suffix selects the
small-image stem (3x3 convolution, no max-pool), e.g. ``random:resnet18-small:3``.

Nothing is ever downloaded: timm and OpenCLIP run with the Hugging Face hub offline, and a missing
package or missing weights is an error that says how to provide them (the portable route is to
export the image encoder with ``torch.jit.script``/``trace`` and use ``torchscript:PATH``).

Each prior declares its evaluation preprocessing (resize the shorter side, center crop,
normalise; no augmentation), its input size and its output width ``dim``. ``identity`` is a
canonical description including a hash of any weight file and the preprocessing: embedding stores
record it, so resuming with a different model or preprocessing is refused.

``preprocess="official"`` (``--prior-preprocess official``) replaces every network prior's
preprocessing by the official ReLA code's (``boostor/rela.py`` ``add_reladata._update``): resize the
shorter side to the crop size S, center crop S, ImageNet normalisation, and the network runs in
float32 (no bf16 autocast on CUDA).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rela_train.data.folder import EvalTransform
from rela_train.models import RESNET_ARCHS, build_resnet

__all__ = [
    "NORMALIZATIONS",
    "PREPROCESSING",
    "ModelPrior",
    "PrecomputedPrior",
    "Prior",
    "load_prior",
]

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

PREPROCESSING = ("prior", "official")

_KINDS = "torchscript, checkpoint, random, pixels, embeddings, timm, open_clip"
_NO_DOWNLOAD_HINT = (
    "rela-train never downloads weights. Export the image encoder to TorchScript on a machine that "
    "has it (torch.jit.trace(model.eval(), example).save('prior.pt')) and use torchscript:PATH"
)


class Prior:
    """Common interface: ``spec`` as given, canonical ``identity``, output width ``dim``."""

    spec: str
    identity: str
    dim: int
    transform: EvalTransform | None

    @property
    def input_size(self) -> int | None:
        return None if self.transform is None else self.transform.size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity!r}, dim={self.dim})"


class ModelPrior(Prior):
    """A frozen network applied to preprocessed images, without gradients.

    On CUDA the batch runs in channels_last under bfloat16 autocast (unless the network's own
    weights are half precision, in which case the input is cast to them).
    """

    def __init__(
        self,
        spec: str,
        identity: str,
        module: nn.Module,
        encode: Callable[[torch.Tensor], torch.Tensor],
        transform: EvalTransform,
        device: torch.device | str = "cpu",
    ) -> None:
        self.spec = spec
        self.transform = transform
        self.module = module.eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self._encode = encode
        # False: run in float32 on CUDA too (the official ReLA code's preprocessing).
        self.autocast = True
        self.device = torch.device(device)
        self.module.to(self.device)
        if self.device.type == "cuda":
            try:
                self.module.to(memory_format=torch.channels_last)
            except (RuntimeError, TypeError):  # some scripted modules refuse; NCHW still works
                pass
        dtypes = {p.dtype for p in self.module.parameters() if p.is_floating_point()}
        self._input_dtype = next((d for d in (torch.float16, torch.bfloat16) if d in dtypes), None)
        self.dim = self._probe_width()
        self.identity = f"{identity} | {transform.describe()}"

    def _probe_width(self) -> int:
        """The embedding width, from a batch shaped as the data reach every prior: RGB (a gray
        image repeated on the three channels) at the prior's input size. A network that takes
        another channel count is refused here, naming both shapes, never broadcast."""
        size = self.transform.size
        channels = _input_channels(self.module)
        if channels is not None and channels != 3:
            raise ValueError(
                f"prior {self.spec}: the network takes {channels}-channel input, but images reach "
                f"a prior as [B, 3, {size}, {size}] (gray repeated to RGB, resized to the prior's "
                "input size); export a 3-channel network"
            )
        try:
            out = self._run(torch.zeros(2, 3, size, size))
        except RuntimeError as error:
            raise ValueError(
                f"prior {self.spec}: the network rejects input of shape [2, 3, {size}, {size}] "
                f"(RGB at the prior's input size): {_first_line(error)}"
            ) from error
        return out.shape[1]

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        if self._input_dtype is not None:
            images, context = images.to(self._input_dtype), nullcontext()
        elif self.device.type == "cuda" and self.autocast:
            context = torch.autocast("cuda", dtype=torch.bfloat16)
        else:
            context = nullcontext()
        with torch.inference_mode(), context:
            out = self._encode(images)
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"prior {self.spec}: the model returned {type(out).__name__}, expected a tensor"
            )
        if out.shape[0] != images.shape[0]:
            raise ValueError(
                f"prior {self.spec}: the model returned shape {tuple(out.shape)} for a batch of "
                f"{images.shape[0]} images"
            )
        return out.flatten(1).float()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` preprocessed images -> float32 ``[B, dim]`` embeddings (on device)."""
        out = self._run(images)
        if out.shape[1] != self.dim:
            raise ValueError(
                f"prior {self.spec}: output width changed from {self.dim} to {out.shape[1]}"
            )
        return out


def _input_channels(module: nn.Module) -> int | None:
    """The input channels of ``module``'s first 4-D weight (its stem convolution), if any."""
    for parameter in module.parameters():
        if parameter.dim() == 4:
            return int(parameter.shape[1])
    return None


class PrecomputedPrior(Prior):
    """Embeddings computed elsewhere, one row per image in dataset order."""

    transform = None

    def __init__(self, spec: str, identity: str, embeddings: np.ndarray | torch.Tensor) -> None:
        self.spec = spec
        self.identity = identity
        self.embeddings = embeddings
        self.dim = int(embeddings.shape[1])

    @property
    def rows(self) -> int:
        return int(self.embeddings.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        chunk = self.embeddings[start:stop]
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.detach().cpu().float().numpy()
        return np.asarray(chunk, dtype=np.float32)


# -------------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------------


def load_prior(
    spec: str,
    *,
    device: torch.device | str = "cpu",
    input_size: int | None = None,
    normalize: str | None = None,
    num_rows: int | None = None,
    preprocess: str = "prior",
) -> Prior:
    """Build the prior described by ``spec`` (see the module docstring).

    Args:
        device: where a network prior runs.
        input_size: override the prior's crop size (the resize grows in proportion).
        normalize: override the normalisation (``imagenet``, ``clip`` or ``none``).
        num_rows: the dataset size; an ``embeddings:`` prior must have exactly this many rows.
        preprocess: ``prior`` (the prior's own preprocessing) or ``official`` (see the module
            docstring; replaces ``normalize`` and the prior's resize ratio).

    Raises:
        ValueError: unknown kind, malformed spec, a file that is not what the kind expects, a row
            count mismatch, or a model/weights that are not available on this machine.
        FileNotFoundError: a named file does not exist.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"prior spec must be a non-empty string, got {spec!r}")
    if input_size is not None and (isinstance(input_size, bool) or input_size < 1):
        raise ValueError(f"input size must be a positive int, got {input_size!r}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ValueError(
            f"normalisation must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}"
        )
    if preprocess not in PREPROCESSING:
        raise ValueError(
            f"--prior-preprocess: expected one of {', '.join(PREPROCESSING)}, got {preprocess!r}"
        )
    kind, _, rest = spec.partition(":")
    loaders: dict[str, Callable[..., Prior]] = {
        "torchscript": _load_torchscript,
        "checkpoint": _load_checkpoint,
        "random": _load_random,
        "pixels": _load_pixels,
        "embeddings": _load_embeddings,
        "timm": _load_timm,
        "open_clip": _load_open_clip,
    }
    if kind not in loaders:
        raise ValueError(f"unknown prior kind {kind!r} in {spec!r}; known kinds: {_KINDS}")
    if kind == "embeddings":
        if input_size is not None or normalize is not None:
            raise ValueError("input size and normalisation do not apply to an embeddings: prior")
        return _load_embeddings(spec, rest, num_rows)
    official = preprocess == "official"
    transform_options = {"input_size": input_size, "normalize": normalize, "official": official}
    prior = loaders[kind](spec, rest, device, transform_options)
    if official and isinstance(prior, ModelPrior):
        prior.autocast = False
        prior.identity += " | float32"
    return prior


def _transform(
    options: Mapping[str, object],
    *,
    size: int,
    resize: int,
    normalize: str,
    interpolation: str,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> EvalTransform:
    """The prior's default preprocessing with the user's overrides applied."""
    new_size = options.get("input_size")
    if new_size is not None:
        # Keep the prior's resize/crop ratio (e.g. 256/224 for ImageNet-style evaluation).
        resize = max(int(new_size), round(int(new_size) * resize / size))
        size = int(new_size)
    if options.get("normalize") is not None:
        normalize, mean, std = str(options["normalize"]), None, None
    if options.get("official"):
        resize, normalize, mean, std = size, "imagenet", None, None
    if mean is None or std is None:
        mean, std = NORMALIZATIONS[normalize]
    return EvalTransform(
        size=size,
        resize=resize,
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        interpolation=interpolation,
    )


def _file(spec: str, path_text: str, what: str) -> Path:
    if not path_text:
        raise ValueError(f"prior {spec!r}: missing the {what} path")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prior {spec!r}: {what} {path} does not exist")
    return path


def _file_id(path: Path) -> str:
    """``name@sha256:<16 hex>``: identifies the file's content, not where it lives."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return f"{path.name}@sha256:{digest.hexdigest()[:16]}"


def _parse_arch(spec: str, text: str, *, allow_small: bool) -> tuple[str, bool]:
    arch, small = text, False
    if allow_small and text.endswith("-small"):
        arch, small = text[: -len("-small")], True
    if arch not in RESNET_ARCHS:
        suffix = " (optionally with -small)" if allow_small else ""
        raise ValueError(
            f"prior {spec!r}: unknown architecture {text!r}; known: "
            f"{', '.join(RESNET_ARCHS)}{suffix}"
        )
    return arch, small


def _resnet_transform(options: Mapping[str, object], small: bool) -> EvalTransform:
    if small:
        return _transform(
            options, size=32, resize=32, normalize="imagenet", interpolation="bilinear"
        )
    return _transform(options, size=224, resize=256, normalize="imagenet", interpolation="bilinear")


def _load_torchscript(spec: str, rest: str, device: str, options: Mapping[str, object]) -> Prior:
    path = _file(spec, rest, "TorchScript archive")
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream, but it is how existing encoders are shipped.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as error:  # torch raises RuntimeError or ValueError depending on the damage
        raise ValueError(
            f"prior {spec!r}: {path} is not a TorchScript archive ({_first_line(error)}); for a "
            "state dict of a ResNet use checkpoint:ARCH:PATH"
        ) from error
    if hasattr(module, "encode_image"):
        encode = module.encode_image
        # OpenAI's CLIP archives carry their resolution; CLIP preprocessing resizes the shorter
        # side straight to the crop size, bicubic, with CLIP's normalisation.
        size = _archive_resolution(module) or 224
        transform = _transform(
            options, size=size, resize=size, normalize="clip", interpolation="bicubic"
        )
    else:
        encode = module
        transform = _transform(
            options, size=224, resize=256, normalize="imagenet", interpolation="bilinear"
        )
    return ModelPrior(spec, f"torchscript:{_file_id(path)}", module, encode, transform, device)


def _archive_resolution(module: torch.jit.ScriptModule) -> int | None:
    value = getattr(module, "input_resolution", None)
    try:
        return int(value.item() if isinstance(value, torch.Tensor) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None


def _load_checkpoint(spec: str, rest: str, device: str, options: Mapping[str, object]) -> Prior:
    arch_text, _, path_text = rest.partition(":")
    if not arch_text or not path_text:
        raise ValueError(f"prior {spec!r}: expected checkpoint:ARCH:PATH")
    arch, _ = _parse_arch(spec, arch_text, allow_small=False)
    path = _file(spec, path_text, "checkpoint")
    state = _read_state_dict(spec, path)
    conv1 = state.get("conv1.weight")
    if not isinstance(conv1, torch.Tensor) or conv1.dim() != 4:
        raise ValueError(
            f"prior {spec!r}: {path} has no conv1.weight [width, channels, k, k]; it is not a "
            f"{arch} state dict"
        )
    # The stem and width are read from the weights, so small-image and narrow nets load too.
    width, in_channels, kernel = conv1.shape[0], conv1.shape[1], conv1.shape[2]
    if in_channels != 3:
        raise ValueError(
            f"prior {spec!r}: the network in {path} takes {in_channels} channels, not RGB"
        )
    small = kernel == 3
    model = build_resnet(arch, small_images=small, width=width)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"prior {spec!r}: {path} is not a {arch} state dict"
            + _keys_note("missing", missing)
            + _keys_note("unexpected", unexpected)
            + _keys_note("wrong shape (file vs model)", mismatched)
        )
    model.load_state_dict(state)
    transform = _resnet_transform(options, small)
    identity = f"checkpoint:{arch}:{_file_id(path)}"
    return ModelPrior(spec, identity, model, model.features, transform, device)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with compiled code next to the pickled data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _read_state_dict(spec: str, path: Path) -> dict[str, torch.Tensor]:
    if _is_torchscript(path):
        raise ValueError(
            f"prior {spec!r}: {path} is a TorchScript archive, not a PyTorch state dict; use "
            "torchscript:PATH"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle or "weights only" failures all mean "not a state dict"
        raise ValueError(
            f"prior {spec!r}: {path} is not a PyTorch state dict ({_first_line(error)}); for a "
            "TorchScript archive use torchscript:PATH"
        ) from error
    # Training checkpoints often wrap the weights; accept the two common wrappers.
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping) and len(state) <= 4:
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"prior {spec!r}: {path} holds a {type(state).__name__}, not a state dict "
            "(a mapping from parameter names to tensors)"
        )
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    # The classifier is not part of the embedding (pooled features are).
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _keys_note(label: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return f"; {label} keys: {shown}"


def _load_random(spec: str, rest: str, device: str, options: Mapping[str, object]) -> Prior:
    arch_text, _, seed_text = rest.partition(":")
    arch, small = _parse_arch(spec, arch_text, allow_small=True)
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        raise ValueError(
            f"prior {spec!r}: the seed must be an integer, got {seed_text!r}"
        ) from None
    # A private RNG state: the prior is the same network for the same seed, whatever ran before,
    # and the caller's global RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_resnet(arch, small_images=small)
    transform = _resnet_transform(options, small)
    identity = f"random:{arch}{'-small' if small else ''}:seed={seed}"
    return ModelPrior(spec, identity, model, model.features, transform, device)


class _Pixels(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _load_pixels(spec: str, rest: str, device: str, options: Mapping[str, object]) -> Prior:
    try:
        size = int(rest) if rest else 16
    except ValueError:
        raise ValueError(f"prior {spec!r}: expected pixels[:SIZE], e.g. pixels:16") from None
    if size < 1:
        raise ValueError(f"prior {spec!r}: the size must be >= 1")
    if options.get("input_size") is not None and options["input_size"] != size:
        raise ValueError(f"prior {spec!r}: set the size in the spec (pixels:SIZE), not separately")
    transform = _transform(
        options, size=size, resize=size, normalize="none", interpolation="bilinear"
    )
    module = _Pixels()
    return ModelPrior(spec, f"pixels:{size}", module, module, transform, device)


def _load_embeddings(spec: str, rest: str, num_rows: int | None) -> Prior:
    path = _file(spec, rest, "embeddings file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array: np.ndarray | torch.Tensor = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ValueError(f"prior {spec!r}: {path} is not a .npy array ({error})") from error
    elif suffix in (".pt", ".pth"):
        try:
            array = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"prior {spec!r}: {path} is not a saved tensor ({_first_line(error)})"
            ) from error
        if isinstance(array, Mapping) and isinstance(array.get("embeddings"), torch.Tensor):
            array = array["embeddings"]
        if not isinstance(array, torch.Tensor):
            raise ValueError(
                f"prior {spec!r}: {path} holds a {type(array).__name__}; expected a tensor [N, D] "
                "(or a dict with an 'embeddings' tensor)"
            )
    else:
        raise ValueError(f"prior {spec!r}: embeddings must be a .npy or .pt file, got {path.name}")
    floating = (
        array.is_floating_point() if isinstance(array, torch.Tensor) else array.dtype.kind == "f"
    )
    if array.ndim != 2 or not floating or array.shape[1] < 1:
        raise ValueError(
            f"prior {spec!r}: {path} must hold a 2-D float array [N, D], got shape "
            f"{tuple(array.shape)} of {array.dtype}"
        )
    if num_rows is not None and array.shape[0] != num_rows:
        raise ValueError(
            f"prior {spec!r}: {path} has {array.shape[0]} rows but the dataset has {num_rows} "
            "images; the rows must be the dataset's images in sorted order"
        )
    return PrecomputedPrior(spec, f"embeddings:{_file_id(path)}", array)


def _require(spec: str, package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ValueError(
            f"prior {spec!r}: the {package} package is not installed. {_NO_DOWNLOAD_HINT}"
        )


def _offline() -> None:
    # Read by huggingface_hub when it is imported: never reach the network.
    os.environ["HF_HUB_OFFLINE"] = "1"


def _load_timm(spec: str, rest: str, device: str, options: Mapping[str, object]) -> Prior:
    name, _, weights = rest.partition(":")
    if not name:
        raise ValueError(f"prior {spec!r}: expected timm:NAME[:WEIGHTS]")
    _require(spec, "timm")
    _offline()
    import timm
    import timm.data

    overlay = None
    if weights:
        overlay = {"file": str(_file(spec, weights, "weights file"))}
    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay
        )
    except Exception as error:  # unknown name, or weights neither given nor cached
        raise ValueError(
            f"prior {spec!r}: timm could not build {name} with local weights "
            f"({_first_line(error)}). Give the weights file as timm:{name}:PATH. "
            f"{_NO_DOWNLOAD_HINT}"
        ) from error
    config = timm.data.resolve_data_config({}, model=model)
    size = int(config["input_size"][-1])
    resize = int(size / float(config.get("crop_pct", 1.0)))
    interpolation = config.get("interpolation", "bicubic")
    transform = _transform(
        options,
        size=size,
        resize=max(size, resize),
        normalize="imagenet",
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )
    identity = f"timm:{name}" + (f":{_file_id(Path(weights).expanduser())}" if weights else "")
    return ModelPrior(spec, identity, model, model, transform, device)


def _load_open_clip(spec: str, rest: str, device: str, options: Mapping[str, object]) -> Prior:
    arch, _, pretrained = rest.partition(":")
    if not arch or not pretrained:
        raise ValueError(f"prior {spec!r}: expected open_clip:ARCH:PRETRAINED (a file or a tag)")
    _require(spec, "open_clip")
    _offline()
    import open_clip

    local = Path(pretrained).expanduser()
    try:
        model = open_clip.create_model(
            arch, pretrained=str(local) if local.is_file() else pretrained, device="cpu"
        )
    except Exception as error:
        raise ValueError(
            f"prior {spec!r}: OpenCLIP could not build {arch} with local weights "
            f"({_first_line(error)}). Give a weights file as open_clip:{arch}:PATH. "
            f"{_NO_DOWNLOAD_HINT}"
        ) from error
    visual = model.visual
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(getattr(visual, "image_mean", None) or NORMALIZATIONS["clip"][0])
    std = tuple(getattr(visual, "image_std", None) or NORMALIZATIONS["clip"][1])
    transform = _transform(
        options,
        size=size,
        resize=size,
        normalize="clip",
        interpolation="bicubic",
        mean=mean,
        std=std,
    )
    weights_id = _file_id(local) if local.is_file() else pretrained
    identity = f"open_clip:{arch}:{weights_id}"
    return ModelPrior(spec, identity, model, model.encode_image, transform, device)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
