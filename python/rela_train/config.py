"""The training configuration: one flat dataclass, a preset plus command-line overrides.

Every field is also a ``rela-train fit`` flag (``--field-name``), generated from the field's
metadata by :func:`add_config_arguments`, so the dataclass, the CLI and ``config.json`` can never
disagree. :meth:`TrainConfig.validate` checks the combination and raises ``ValueError`` with a
message that names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rela_train.arg_types import Bounds, device
from rela_train.transition import parse_transition, resolve_transition

__all__ = [
    "DATASETS",
    "LEGACY_VALUES",
    "POLICIES",
    "RENAMED_KEYS",
    "TrainConfig",
    "add_config_arguments",
    "config_from_args",
    "given_changes",
    "parse_checkpoint_every",
    "parse_step_window",
    "parse_switch",
]

DATASETS = ("fashion-mnist", "folder", "synthetic")
POLICIES = ("random", "hard", "easy", "infobatch", "inbatch")
# Keys of config.json (and of checkpoints' configs) renamed since; old files still load.
RENAMED_KEYS = {"selection": "policy"}
OPTIMIZERS = ("lars", "adamw")
RELA_HEADS = ("frozen", "trainable")
RECIPES = ("default", "official")
LR_SCHEDULES = ("cosine", "constant")
LR_SCALINGS = ("linear", "none")
TAU_SCHEDULES = ("cosine", "constant")
PROJ_HIDDEN_RULES = ("fixed", "double")
RELA_DIM_RULES = ("fixed", "min-width")
CONST_SWITCHES = ("step", "epoch")
ON_OFF = ("on", "off")
PRIOR_PREPROCESSING = ("prior", "official")
PROBES = ("lbfgs", "official", "none")
DECAY_EXCLUSIONS = ("bias-norm", "none")
SWITCH_SCORES = ("reset", "keep")
INBATCH_SWITCH_LOSSES = ("scored", "kept")
AMP_MODES = ("auto", "bf16", "off")
# Settings that cannot change a run's results: the only ones `fit --resume` may change.
RESUME_SETTINGS = ("progress", "threads", "tensorboard", "checkpoint_every", "keep_checkpoints")
DECODERS = ("auto", "pil", "simplejpeg")


AT_LEAST_ONE = Bounds(1)
NON_NEGATIVE = Bounds(0)
POSITIVE = Bounds(0, low_open=True)
UNIT = Bounds(0, 1)
UNIT_OPEN_TOP = Bounds(0, 1, high_open=True)
UNIT_OPEN_BOTTOM = Bounds(0, 1, low_open=True)
_BATCHNORM_BATCH = Bounds(2, note=" (BatchNorm needs at least two images per batch)")
_SECONDS = Bounds(0, low_open=True, note=" seconds")


def _opt(
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    bounds: Bounds | None = None,
    parse: Callable[[str], Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A field's metadata: its help, and what :meth:`TrainConfig.validate` checks: ``choices``
    (the allowed strings, also argparse's), ``bounds`` (a number's range) or ``parse`` (a parser
    of the text raising ValueError that names the flag)."""
    return {"help": help, "choices": choices, "bounds": bounds, "parse": parse, **extra}


def parse_switch(text: str) -> tuple[str, float | None]:
    """``adaptive`` | ``never`` | ``const:F`` (0 <= F <= 1) -> ``(kind, F or None)``."""
    if text in ("adaptive", "never"):
        return text, None
    kind, _, value = text.partition(":")
    if kind == "const":
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if 0.0 <= fraction <= 1.0:
            return "const", fraction
    raise ValueError(
        f"--switch: expected adaptive, never or const:F with F in [0, 1], got {text!r}"
    )


def parse_step_window(text: str) -> tuple[int, int]:
    """``BEFORE:AFTER`` (whole numbers >= 0) -> ``(before, after)``; raises ValueError naming
    ``--eval-steps-window``."""
    before, colon, after = text.partition(":")
    if not (colon and before.isdigit() and after.isdigit()):
        raise ValueError(
            f"--eval-steps-window: expected BEFORE:AFTER (steps, whole numbers >= 0), got {text!r}"
        )
    return int(before), int(after)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh])")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_checkpoint_every(text: str) -> tuple[int | None, float | None]:
    """``--checkpoint-every``: ``N`` (optimizer steps, >= 1) -> ``(N, None)``; a duration
    ``90s``, ``30m``, ``1.5h`` (> 0) -> ``(None, seconds)``. Raises ValueError naming the flag."""
    value = text.strip()
    steps = int(value) if value.isdigit() else None
    duration = _DURATION.fullmatch(value)
    seconds = float(duration[1]) * _UNIT_SECONDS[duration[2]] if duration else None
    if (steps is None or steps < 1) and not (seconds is not None and seconds > 0):
        raise ValueError(
            "--checkpoint-every: expected a number of optimizer steps >= 1 or a duration > 0 "
            f"such as 90s, 30m or 2h, got {text!r}"
        )
    return (steps, None) if steps is not None else (None, seconds)


def parse_device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` (or another backend's name); raises ValueError
    naming ``--device``."""
    try:
        return device(text)
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"--device: {error}") from None


def given_changes(**values: Any) -> dict[str, Any]:
    """The configuration changes a caller gave: ``values`` less those that are None."""
    return {name: value for name, value in values.items() if value is not None}


@dataclass
class TrainConfig:
    """Everything that defines a run (written to ``config.json`` in the run directory)."""

    # -- data ----------------------------------------------------------------------------------
    dataset: str = field(default="fashion-mnist", metadata=_opt("training data", choices=DATASETS))
    data_dir: str | None = field(
        default=None,
        metadata=_opt(
            "fashion-mnist: directory of the IDX files (default: Debian's dataset-fashion-mnist "
            "location); folder: the training image folder (class subfolders)"
        ),
    )
    val_dir: str | None = field(
        default=None, metadata=_opt("folder: image folder used for kNN / linear-probe evaluation")
    )
    val_labels: str | None = field(
        default=None,
        metadata=_opt(
            "folder: the labels of a flat --val-dir (ImageNet's validation layout): a CSV of "
            "IMAGE,CLASS rows, or one label per line in sorted file-name order (docs/imagenet.md)"
        ),
    )
    train_subset: int | None = field(
        default=None,
        metadata=_opt(
            "train on a fixed random subset of this many training images (all if unset)",
            bounds=AT_LEAST_ONE,
        ),
    )
    val_subset: int | None = field(
        default=None,
        metadata=_opt("evaluate on a fixed random subset of this many images", bounds=AT_LEAST_ONE),
    )
    image_size: int = field(
        default=28, metadata=_opt("side of the augmented crops, in pixels", bounds=AT_LEAST_ONE)
    )
    load_size: int | None = field(
        default=None,
        metadata=_opt(
            "folder: images are decoded, resized and center-cropped to this side before the "
            "(batched) augmentation (default: 8/7 of --image-size)",
            bounds=AT_LEAST_ONE,
        ),
    )
    workers: int = field(
        default=0, metadata=_opt("folder: image decoding processes per rank", bounds=NON_NEGATIVE)
    )
    decoder: str = field(
        default="auto",
        metadata=_opt(
            "folder: JPEG decoder (auto: simplejpeg when installed, else Pillow)",
            choices=DECODERS,
        ),
    )
    prefetch: int = field(
        default=4,
        metadata=_opt("folder: batches each decoding process prepares ahead", bounds=AT_LEAST_ONE),
    )
    # -- model ---------------------------------------------------------------------------------
    arch: str = field(default="resnet18", metadata=_opt("backbone (resnet10/18/34/50/101/152)"))
    width: int = field(
        default=64, metadata=_opt("channels of the first ResNet stage", bounds=AT_LEAST_ONE)
    )
    small_images: bool = field(
        default=False, metadata=_opt("3x3 stride-1 stem without max-pool (for 32 px images)")
    )
    init_backbone: str | None = field(
        default=None,
        metadata=_opt(
            "start the online and target backbones from this backbone file (safetensors or a "
            "weights-only .pt state dict: `rela-train export`, or torchvision's ResNet weights); "
            "its keys and shapes must match --arch/--width/--small-images",
            metavar="FILE",
        ),
    )
    byol_blur: str = field(
        default="on",
        metadata=_opt(
            "Gaussian blur in the BYOL views (off: as the official code for CIFAR-size images)",
            choices=ON_OFF,
        ),
    )
    proj_hidden: int = field(
        default=4096, metadata=_opt("hidden width of projector/predictor", bounds=AT_LEAST_ONE)
    )
    proj_hidden_rule: str = field(
        default="fixed",
        metadata=_opt(
            "projector/predictor hidden width: fixed (--proj-hidden) or double (2 x the "
            "backbone's feature width, the official code)",
            choices=PROJ_HIDDEN_RULES,
        ),
    )
    proj_dim: int = field(
        default=256, metadata=_opt("output width of projector and predictor", bounds=AT_LEAST_ONE)
    )
    # -- optimisation --------------------------------------------------------------------------
    recipe: str = field(
        default="default",
        metadata=_opt(
            "default (this project's BYOL recipe) or official (the official ReLA code's: see "
            "docs/trainer.md); the recipe sets only the settings not given as flags",
            choices=RECIPES,
        ),
    )
    epochs: int = field(default=100, metadata=_opt("training epochs", bounds=AT_LEAST_ONE))
    batch_size: int = field(
        default=256, metadata=_opt("images per optimizer micro-batch", bounds=_BATCHNORM_BATCH)
    )
    accum_steps: int = field(
        default=1, metadata=_opt("micro-batches per optimizer step", bounds=AT_LEAST_ONE)
    )
    global_batch: int | None = field(
        default=None,
        metadata=_opt(
            "images per optimizer step over all ranks; sets --accum-steps to global_batch / "
            "(batch_size x world size), which must be a whole number",
            bounds=AT_LEAST_ONE,
        ),
    )
    optimizer: str = field(default="lars", metadata=_opt("optimizer", choices=OPTIMIZERS))
    lr: float = field(
        default=0.2,
        metadata=_opt(
            "base learning rate per 256 images (scaled by the effective batch / 256)",
            bounds=POSITIVE,
        ),
    )
    lr_schedule: str = field(
        default="cosine",
        metadata=_opt(
            "cosine (linear warmup, then cosine decay to 0) or constant (--lr throughout)",
            choices=LR_SCHEDULES,
        ),
    )
    lr_scaling: str = field(
        default="linear",
        metadata=_opt(
            "linear (--lr x effective batch / 256) or none (--lr as given)", choices=LR_SCALINGS
        ),
    )
    weight_decay: float = field(default=1.5e-6, metadata=_opt("weight decay", bounds=NON_NEGATIVE))
    decay_exclude: str = field(
        default="bias-norm",
        metadata=_opt(
            "parameters spared from weight decay: bias-norm (biases and normalisation weights, "
            "BYOL's convention) or none (every parameter is decayed, the official code)",
            choices=DECAY_EXCLUSIONS,
        ),
    )
    momentum: float = field(default=0.9, metadata=_opt("LARS momentum", bounds=UNIT_OPEN_TOP))
    lars_eta: float = field(default=0.001, metadata=_opt("LARS trust coefficient", bounds=POSITIVE))
    warmup_epochs: float = field(
        default=10.0, metadata=_opt("linear warmup, in epochs", bounds=NON_NEGATIVE)
    )
    probe_lr: float = field(
        default=0.1, metadata=_opt("learning rate of the online linear probe", bounds=POSITIVE)
    )
    ema_base: float = field(
        default=0.99, metadata=_opt("target EMA tau at step 0 (see --tau-schedule)", bounds=UNIT)
    )
    tau_schedule: str = field(
        default="cosine",
        metadata=_opt(
            "target EMA tau: cosine (--ema-base -> 1.0) or constant (--ema-base throughout)",
            choices=TAU_SCHEDULES,
        ),
    )
    # -- ReLA ----------------------------------------------------------------------------------
    prior: str | None = field(
        default=None,
        metadata=_opt(
            "enable ReLA with this prior (pixels[:SIZE], random:ARCH[:SEED], ...); the "
            "embeddings are computed into RUN/prior once. A torchscript:PATH prior runs the "
            "archive's code: use only archives you trust"
        ),
    )
    prior_store: str | None = field(
        default=None,
        metadata=_opt("enable ReLA with an existing embedding store (with transport.pt)"),
    )
    rela_dim: int = field(
        default=256, metadata=_opt("transport width d when computing a prior", bounds=AT_LEAST_ONE)
    )
    rela_dim_rule: str = field(
        default="fixed",
        metadata=_opt(
            "transport width when computing a prior: fixed (--rela-dim) or min-width (min of the "
            "backbone's feature width and the prior's width, the official code)",
            choices=RELA_DIM_RULES,
        ),
    )
    rela_head: str = field(
        default="frozen",
        metadata=_opt(
            "ReLA linear head: frozen (random, not optimised: the official code) or trainable "
            "(this project's variant)",
            choices=RELA_HEADS,
        ),
    )
    prior_preprocess: str = field(
        default="prior",
        metadata=_opt(
            "--prior preprocessing: prior (each prior's own resize/crop/normalisation; bf16 on "
            "CUDA) or official (Resize(S) + CenterCrop(S), ImageNet normalisation, float32)",
            choices=PRIOR_PREPROCESSING,
        ),
    )
    switch: str = field(
        default="adaptive",
        metadata=_opt(
            "ReLA -> BYOL switch: adaptive (EMA plateau rule), const:F, or never",
            parse=parse_switch,
        ),
    )
    switch_transition: str = field(
        default="auto",
        metadata=_opt(
            "what happens at the ReLA -> BYOL switch: auto (keep-views, the best measured, in a "
            "run that switches on in-memory small images such as Fashion-MNIST; hard on image "
            "folders, where it is not measured, and without a switch), hard (the official code, "
            "kept by --recipe official), or parts joined by +: blend:STEPS, reset-target, "
            "warm-heads:STEPS, keep-views, lr-drop:STEPS (docs/switch.md)"
        ),
    )
    const_switch: str = field(
        default="step",
        metadata=_opt(
            "const:F semantics: step (after round(F x total steps) steps) or epoch (at the start "
            "of epoch floor(F x epochs), the official code)",
            choices=CONST_SWITCHES,
        ),
    )
    # -- data selection ------------------------------------------------------------------------
    budget: float = field(
        default=1.0,
        metadata=_opt("fraction of the data per epoch, in (0, 1]", bounds=UNIT_OPEN_BOTTOM),
    )
    policy: str = field(
        default="random",
        metadata=_opt("subset policy", choices=POLICIES, aliases=("--selection",)),
    )
    anneal: float | None = field(
        default=None,
        metadata=_opt(
            "annealing: the last floor(DELTA x epochs) epochs train on the full data with weight "
            "1 (InfoBatch); DELTA in [0, 1); unset: 0.125 for infobatch, else 0",
            bounds=UNIT_OPEN_TOP,
        ),
    )
    switch_scores: str = field(
        default="reset",
        metadata=_opt(
            "scores at the ReLA -> BYOL switch: reset (the table starts over at 2.0 and the next "
            "epoch draws hard/easy at random) or keep (ReLA losses rank the first BYOL epoch)",
            choices=SWITCH_SCORES,
        ),
    )
    inbatch_switch_loss: str = field(
        default="scored",
        metadata=_opt(
            "inbatch: the loss the switch rule reads, the mean of the whole scored batch (scored) "
            "or of the back-propagated hardest rows (kept)",
            choices=INBATCH_SWITCH_LOSSES,
        ),
    )
    # -- engine --------------------------------------------------------------------------------
    seed: int = field(
        default=0,
        metadata=_opt("seed of initialisation, subsets, augmentation", bounds=NON_NEGATIVE),
    )
    device: str = field(
        default="auto", metadata=_opt("auto, cpu, cuda, cuda:N", parse=parse_device)
    )
    amp: str = field(
        default="auto", metadata=_opt("bf16 autocast (auto: on CUDA only)", choices=AMP_MODES)
    )
    channels_last: bool | None = field(
        default=None, metadata=_opt("channels_last memory format (default: on CUDA only)")
    )
    compile: bool = field(default=False, metadata=_opt("torch.compile the backbone"))
    sync_bn: bool | None = field(
        default=None,
        metadata=_opt("synchronise BatchNorm across ranks (default: on for multi-GPU CUDA runs)"),
    )
    dist_timeout: float = field(
        default=1800.0,
        metadata=_opt(
            "seconds a collective may wait for the other ranks before the run fails with a "
            "clear error (a dead or hung rank)",
            bounds=_SECONDS,
        ),
    )
    threads: int | None = field(
        default=None,
        metadata=_opt("CPU threads for torch (default: torch's choice)", bounds=AT_LEAST_ONE),
    )
    # -- evaluation ----------------------------------------------------------------------------
    knn_k: int = field(default=200, metadata=_opt("kNN neighbours", bounds=AT_LEAST_ONE))
    knn_t: float = field(default=0.1, metadata=_opt("kNN temperature", bounds=POSITIVE))
    eval_every: int = field(
        default=1,
        metadata=_opt(
            "kNN evaluation every this many epochs (0: only at the end)", bounds=NON_NEGATIVE
        ),
    )
    eval_steps: int = field(
        default=0,
        metadata=_opt(
            "also kNN on the eval bank every this many optimizer steps (0: off); not counted as "
            "training time, recorded as step_eval lines and in the summary",
            bounds=NON_NEGATIVE,
        ),
    )
    eval_steps_window: str | None = field(
        default=None,
        metadata=_opt(
            "BEFORE:AFTER: the --eval-steps evaluations only from BEFORE steps before the ReLA "
            "-> BYOL switch (snapshots, evaluated at the switch) to AFTER steps after it",
            parse=parse_step_window,
        ),
    )
    eval_bank: int | None = field(
        default=None,
        metadata=_opt(
            "per-epoch kNN: use at most this many training images as the bank", bounds=AT_LEAST_ONE
        ),
    )
    probe: str = field(
        default="lbfgs",
        metadata=_opt(
            "final linear probe: lbfgs (standardised features, full batch), official (the "
            "official code's: Adam 3e-4, batch 128, raw features, mean of the last 3 epochs) "
            "or none",
            choices=PROBES,
        ),
    )
    probe_epochs: int = field(
        default=100,
        metadata=_opt(
            "final linear probe: L-BFGS iterations, or the official probe's epochs (0: none)",
            bounds=NON_NEGATIVE,
        ),
    )
    progress: bool = field(default=True, metadata=_opt("show a progress bar"))
    # -- checkpoints ---------------------------------------------------------------------------
    checkpoint_every: str | None = field(
        default=None,
        metadata=_opt(
            "also write a step checkpoint every N optimizer steps, or every DURATION of wall "
            "time (90s, 30m, 2h), besides the one at the end of each epoch",
            parse=parse_checkpoint_every,
            metavar="N|DURATION",
        ),
    )
    keep_checkpoints: int = field(
        default=2,
        metadata=_opt(
            "step checkpoints kept (the newest; older ones deleted once a new one is durable)",
            bounds=AT_LEAST_ONE,
            metavar="K",
        ),
    )
    tensorboard: str | None = field(
        default=None,
        metadata=_opt(
            "also write the metrics as TensorBoard scalars to DIR (relative to the run "
            "directory; without DIR: RUN/tensorboard); needs the tensorboard package (pip "
            "install tensorboard, or this package's [tensorboard] extra)",
            nargs="?",
            const="tensorboard",
            metavar="DIR",
        ),
    )

    # ------------------------------------------------------------------------------------------

    @property
    def anneal_fraction(self) -> float:
        """The annealed fraction of the epochs: ``--anneal``, or when unset 0.125 for
        ``infobatch`` (InfoBatch's default) and 0 for the other policies."""
        if self.anneal is not None:
            return self.anneal
        return 0.125 if self.policy == "infobatch" else 0.0

    @property
    def rela(self) -> bool:
        return self.prior is not None or self.prior_store is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @staticmethod
    def upgrade_keys(values: dict[str, Any]) -> dict[str, Any]:
        """``values`` as this version writes a config: the keys of
        :data:`RENAMED_KEYS` under their current names (a file holding both the old and the new
        name is refused), and every setting of :data:`LEGACY_VALUES` the file lacks set to the
        value it ran with (a config written before the setting existed)."""
        upgraded = dict(values)
        for old, new in RENAMED_KEYS.items():
            if old in upgraded:
                if new in upgraded:
                    raise ValueError(f"config has both {old} and {new}; keep only {new}")
                upgraded[new] = upgraded.pop(old)
        return {**LEGACY_VALUES, **upgraded}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object of settings, got {type(values).__name__}")
        # Renamed keys, and a config.json written before a setting existed resumes with the
        # behaviour it ran with.
        values = cls.upgrade_keys(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**values).validate()

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the configuration {path}: {error}") from error
        try:
            return cls.from_dict(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    @property
    def concrete_transition(self) -> str:
        """``switch_transition`` with ``auto`` made concrete for this run (``keep-views`` where it
        switches from ReLA to BYOL on in-memory small images, ``hard`` elsewhere;
        docs/switch.md)."""
        return resolve_transition(
            self.switch_transition, rela=self.rela, switch=self.switch, dataset=self.dataset
        )

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes).validate()

    def validate(self) -> TrainConfig:
        """Check every field against its metadata (type, finiteness, choices, bounds, parser; an
        optional text is never empty), then the combinations; raises ValueError naming the flag
        (the same checks for flags and for a ``config.json`` read on resume). Returns self."""
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        from rela_train.models import RESNET_ARCHS  # imports torch: not at module level

        _need(
            self.arch in RESNET_ARCHS,
            "arch",
            f"must be one of {', '.join(RESNET_ARCHS)}",
            repr(self.arch),
        )
        _need(
            self.dataset != "folder" or self.data_dir is not None,
            "data_dir",
            "the folder dataset needs --data-dir (an image folder)",
            "none",
        )
        _need(
            self.load_size is None or self.load_size >= self.image_size,
            "load_size",
            f"must be >= --image-size ({self.image_size})",
            repr(self.load_size),
        )
        _need(
            self.prior is None or self.prior_store is None,
            "prior",
            "give either --prior or --prior-store, not both",
            f"--prior {self.prior!r} and --prior-store {self.prior_store!r}",
        )
        _need(
            self.policy != "inbatch" or not self.anneal,
            "anneal",
            "does not apply to --policy inbatch (every batch is scored)",
            repr(self.anneal),
        )
        if not parse_transition(self.concrete_transition).hard:
            _need(
                self.rela,
                "switch_transition",
                "needs ReLA (--prior or --prior-store)",
                repr(self.switch_transition),
            )
            _need(
                self.switch != "never",
                "switch_transition",
                "needs a switch, but --switch is never",
                repr(self.switch_transition),
            )
        if self.eval_steps_window is not None:
            _need(
                self.eval_steps >= 1,
                "eval_steps_window",
                "needs --eval-steps N >= 1",
                repr(self.eval_steps_window),
            )
            _need(
                self.rela and self.switch != "never",
                "eval_steps_window",
                "is relative to the switch: needs ReLA with a switch",
                repr(self.eval_steps_window),
            )
        return self


# Settings added after config.json files were first written: a file without the key ran with
# this value (the default may since have changed, as rela_head's did).
LEGACY_VALUES: dict[str, Any] = {
    "recipe": "default",
    "proj_hidden_rule": "fixed",
    "byol_blur": "on",
    "lr_schedule": "cosine",
    "lr_scaling": "linear",
    "tau_schedule": "cosine",
    "rela_dim_rule": "fixed",
    "rela_head": "trainable",
    "prior_preprocess": "prior",
    "const_switch": "step",
    "anneal": 0.0,
    "switch_scores": "keep",
    "inbatch_switch_loss": "kept",
    "probe": "lbfgs",
    "switch_transition": "hard",
    "eval_steps": 0,
    "eval_steps_window": None,
    "decay_exclude": "bias-norm",
    "init_backbone": None,
}

_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def _need(ok: bool, name: str, message: str, got: str) -> None:
    """Unless ``ok``, raise the one-line error every check gives: ``--flag: message, got ...``."""
    if not ok:
        raise ValueError(f"--{name.replace('_', '-')}: {message}, got {got}")


def _check_field(f: dataclasses.Field, value: Any) -> None:
    """``value`` has ``f``'s declared type (an int is a float; a bool is neither), a float is
    finite, and it passes ``f``'s metadata (choices, bounds, parser); an optional text is not
    empty. Raises ValueError naming the flag."""
    annotation = str(f.type).replace(" ", "")
    optional = annotation.endswith("|None")
    expected = _TYPES[annotation.removesuffix("|None")]
    if value is None and optional:
        return
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        wanted = expected.__name__ + (" or null" if optional else "")
        _need(False, f.name, f"expected {wanted}", f"{value!r} ({type(value).__name__})")
    if expected is float:
        _need(math.isfinite(value), f.name, "must be a finite number", repr(value))
    choices, bounds, parse = (f.metadata.get(key) for key in ("choices", "bounds", "parse"))
    if choices is not None:
        _need(value in choices, f.name, f"must be one of {', '.join(choices)}", repr(value))
    if bounds is not None:
        _need(value in bounds, f.name, f"must be {bounds}", repr(value))
    if expected is str and optional:
        _need(value.strip() != "", f.name, "must not be empty", repr(value))
    if parse is not None:
        parse(value)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _field_type(f: dataclasses.Field) -> type:
    annotation = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if annotation.startswith(name):
            return kind
    return str


def _optional_int(f: dataclasses.Field) -> bool:
    return str(f.type).replace(" ", "") == "int|None"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` field; unset flags stay ``None`` (= preset).

    Optional integer settings take ``0`` for "unset" (so a preset's value can be cleared)."""
    group = parser.add_argument_group("configuration (overrides the preset)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        help_text = f.metadata.get("help", "")
        if _optional_int(f):
            help_text += " (0: unset)"
        # %% escapes argparse's formatting; a preset may set its own value.
        shown = f.default if f.default is not dataclasses.MISSING else None
        help_text += f" (default: {'unset' if shown is None else shown}, or the preset's)"
        help_text = help_text.replace("%", "%%").replace("%%(", "%(")
        choices = f.metadata.get("choices")
        flags = (flag, *f.metadata.get("aliases", ()))  # aliases: earlier names of the flag
        if kind is bool:
            group.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )  # fmt: skip
        else:
            extra = {k: f.metadata[k] for k in ("nargs", "const") if k in f.metadata}
            metavar = f.metadata.get("metavar", f.name.upper())
            group.add_argument(
                *flags, dest=f.name, type=kind, choices=choices, default=None,
                metavar=metavar if choices is None else None, help=help_text, **extra,
            )  # fmt: skip


def config_from_args(base: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``base`` with every flag that was given on the command line applied."""
    changes = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    for f in dataclasses.fields(TrainConfig):
        if _optional_int(f) and changes.get(f.name) == 0:
            changes[f.name] = None
    from rela_train.presets import apply_recipe  # presets are built on this module

    return apply_recipe(dataclasses.replace(base, **changes), explicit=set(changes))
