"""``rela-train export``: a run's online backbone as a bare state dict, with a JSON sidecar.

The file holds the online backbone only (no projector, predictor, target network, ReLA head or
probe) under torchvision's keys, without wrapper prefixes. A standard-stem ResNet-18/34/50/101/152
at width 64 is the torchvision (and timm) model of that name: it loads with ``strict=True`` once
the classifier ``fc`` is left out. The small-image stem or another width is not; the file is
then our own layout, rebuilt by the few lines in docs/backbone.md.

The sidecar (``FILE.json``) records what a user needs to feed the backbone (arch, width, stem,
input size, normalisation) and where it came from (the run's preset, data fingerprint, prior,
budget, epochs, final kNN and probe, git sha, and its whole configuration).

The run may be finished or interrupted: its latest checkpoint is exported.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rela_kernels.atomic_io import atomic_write, atomic_write_text
from rela_train.backbone_io import (
    FORMATS,
    BackboneSpec,
    backbone_state,
    infer_resnet,
    serialise_backbone,
    torchvision_incompatibility,
)
from rela_train.checkpoint import checkpoint_path, load_checkpoint
from rela_train.config import TrainConfig
from rela_train.models import resnet_feature_dim

__all__ = ["SIDECAR_FORMAT", "ExportResult", "export_backbone", "normalisation", "sidecar_path"]

SIDECAR_FORMAT = "rela-train-backbone-v1"
# Where the online backbone sits in a checkpoint's learner state dict.
ONLINE_BACKBONE = "byol.backbone."


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sidecar: Path
    spec: BackboneSpec
    # None when the file is the torchvision/timm model of its arch, else why not.
    not_torchvision: str | None
    finished: bool
    epoch: int

    def summary(self) -> str:
        what = f"{self.spec.arch}, {self.spec.stem} stem, width {self.spec.width}"
        if self.not_torchvision is None:
            where = (
                f"loads with strict=True into torchvision.models.{self.spec.arch}() and "
                f"timm.create_model('{self.spec.arch}') with fc left out"
            )
        else:
            where = f"not a torchvision model ({self.not_torchvision}): see docs/backbone.md"
        state = "finished run" if self.finished else f"interrupted run, after epoch {self.epoch}"
        return f"{self.path} ({what}; {state}) {where}; sidecar {self.sidecar}"


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The sidecar of a backbone file: ``FILE.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def normalisation(config: TrainConfig, channels: int) -> dict[str, list[float]]:
    """The per-channel ``mean`` and ``std`` (on the [0, 1] scale) the run fed its backbone."""
    if config.dataset == "fashion-mnist":
        from rela_train.data.fashion_mnist import MEAN, STD
    elif config.dataset == "synthetic":
        from rela_train.data.synthetic import MEAN, STD
    else:
        from rela_train.data.sources import IMAGENET_MEAN as MEAN
        from rela_train.data.sources import IMAGENET_STD as STD
    return {"mean": list(MEAN[:channels]), "std": list(STD[:channels])}


def _check_out(out: Path, fmt: str, force: bool) -> None:
    """Refuse, before anything is read or written, an output that cannot or must not be written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    parent = out.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ValueError(
            f"--out: expected a file in an existing directory, got {out} ({parent} {what})"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"--out: expected a writable directory, got {out} ({parent} is not writable)"
        )
    for path in (out, sidecar_path(out)):
        if path.is_dir():
            raise ValueError(f"--out: expected a file path, got the directory {path}")
        if path.exists() and not force:
            raise ValueError(
                f"--out: expected a new file (pass --force to replace it), got the existing {path}"
            )


def _run_checkpoint(run: Path) -> Path:
    if run.is_dir():
        checkpoint = checkpoint_path(run)
        if not checkpoint.is_file():
            raise ValueError(
                f"RUN: expected a run directory with a checkpoint, got {run}, which has no "
                f"{checkpoint.relative_to(run)} (the run has not finished its first epoch, or it "
                "is not a run directory)"
            )
        return checkpoint
    if run.is_file():
        return run
    raise ValueError(f"RUN: expected a run directory or a checkpoint file, got {run} (missing)")


def _final_figures(run: Path, state: dict[str, Any], finished: bool) -> dict[str, Any]:
    """The finished run's final kNN and probe (summary.json), else its latest per-epoch kNN."""
    summary_file = run / "summary.json"
    if finished and run.is_dir() and summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            summary = None
        if isinstance(summary, dict):
            keys = ("knn_acc", "linear_acc", "probe", "linear_acc_official",
                    "linear_acc_official_std")  # fmt: skip
            return {"final": True, **{k: summary.get(k) for k in keys}}
    evaluations = state.get("evaluations") or []
    if evaluations:
        last = evaluations[-1]
        return {"final": False, "knn_acc": last.get("knn_acc"), "epoch": last.get("epoch")}
    return {"final": False, "knn_acc": None}


def export_backbone(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fmt: str = "safetensors",
    force: bool = False,
) -> ExportResult:
    """Write the online backbone of ``run`` (a run directory or a checkpoint file) to ``out``
    (format ``fmt``: ``safetensors`` or ``pt``) and its sidecar to ``out.json``.

    Bad input (no checkpoint, an output directory that is missing or not writable, an existing
    output without ``force``) raises a one-line ValueError before anything is written; both files
    are written atomically, and a failure of the second removes the first."""
    run, out = Path(run), Path(out)
    _check_out(out, fmt, force)
    checkpoint = _run_checkpoint(run)
    state = load_checkpoint(checkpoint)
    run_dir = checkpoint.parent.parent if run.is_file() else run
    config = TrainConfig.from_dict(state["config"])
    tensors = backbone_state(state["learner"], ONLINE_BACKBONE)
    spec = infer_resnet(tensors, "RUN")
    not_torchvision = torchvision_incompatibility(spec)
    counters = state["counters"]
    finished = counters["epoch"] >= config.epochs
    metadata = {
        "format": SIDECAR_FORMAT,
        "arch": spec.arch,
        "width": str(spec.width),
        "stem": spec.stem,
        "in_channels": str(spec.in_channels),
    }
    payload = serialise_backbone(tensors, fmt, metadata)
    provenance = state.get("provenance") or {}
    sidecar = {
        "format": SIDECAR_FORMAT,
        "file": out.name,
        "file_format": fmt,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "arch": spec.arch,
        "width": spec.width,
        "stem": spec.stem,
        "in_channels": spec.in_channels,
        "feature_dim": resnet_feature_dim(spec.arch, spec.width),
        "torchvision_compatible": not_torchvision is None,
        "not_torchvision": not_torchvision,
        "input": {
            "size": config.image_size,
            "normalisation": normalisation(config, spec.in_channels),
            "pixels": "RGB scaled to [0, 1], then (x - mean) / std per channel",
        },
        "run": {
            "dir": str(run_dir),
            "checkpoint": str(checkpoint),
            "finished": finished,
            "epochs": config.epochs,
            "epochs_done": counters["epoch"],
            "steps": counters["global_step"],
            "samples_seen": counters["samples_seen"],
            "preset": provenance.get("preset"),
            "dataset": config.dataset,
            "data_fingerprint": provenance.get("data_fingerprint"),
            "prior": config.prior or config.prior_store,
            "budget": config.budget,
            "policy": config.policy,
            "evaluation": _final_figures(run_dir, state, finished),
            "git_sha": provenance.get("git_sha"),
            **(
                {"resumed_git_sha": provenance["resumed_git_sha"]}
                if "resumed_git_sha" in provenance
                else {}
            ),  # fmt: skip
            "config": config.to_dict(),
        },
    }
    atomic_write(out, lambda handle: handle.write(payload))
    try:
        atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return ExportResult(out, sidecar_path(out), spec, not_torchvision, finished, counters["epoch"])
