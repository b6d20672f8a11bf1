"""The command-line side of backbone files: the ``export`` command and ``eval --backbone``.

:mod:`rela_train.commands` registers them; the work is in :mod:`rela_train.export` and
:func:`rela_train.evaluate.evaluate_backbone_file`. Heavy imports happen inside the ``run``
functions, so ``rela-train --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rela_train.arg_types import non_empty, positive_int
from rela_train.config import DATASETS

__all__ = [
    "EXPORT_HELP",
    "add_backbone_eval_arguments",
    "check_checkpoint_eval",
    "export_arguments",
    "export_run",
    "print_eval_result",
    "run_backbone_eval",
    "shared_eval_options",
]

EXPORT_HELP = (
    "write a run's online backbone as a bare state dict (safetensors or .pt) with a JSON sidecar"
)
FORMATS = ("safetensors", "pt")  # backbone_io.FORMATS, named here without importing torch


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run",
        metavar="RUN",
        type=non_empty,
        help="a run directory, finished or interrupted (its latest checkpoint), or a checkpoint",
    )
    parser.add_argument(
        "--out", required=True, type=non_empty, help="backbone file to write (sidecar: OUT.json)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="safetensors",
        help="safetensors (default) or pt (a weights-only torch state dict); neither needs "
        "unpickling to load",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace OUT and OUT.json if they exist"
    )


def export_run(args: argparse.Namespace) -> int:
    from rela_train.export import export_backbone

    result = export_backbone(args.run, args.out, fmt=args.format, force=args.force)
    print(f"wrote {result.summary()}")
    return 0


def add_backbone_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` flags of a backbone file (instead of a checkpoint)."""
    group = parser.add_argument_group("a backbone file instead of a checkpoint")
    group.add_argument(
        "--backbone",
        metavar="FILE",
        type=non_empty,
        default=None,
        help="evaluate a backbone file: one written by `rela-train export` (its run's data and "
        "protocol by default) or any torchvision-layout ResNet state dict (safetensors or a "
        "weights-only .pt; fc is ignored)",
    )
    group.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="with --backbone: the data (default: the sidecar's run's; required without one)",
    )
    group.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="with --backbone: the evaluation image side (default: the sidecar's, else 224 for "
        "the standard stem, 32 for the small-image stem)",
    )


# The ``eval`` flags a checkpoint and a backbone file take alike, by their keyword names.
SHARED_EVAL_FLAGS = (
    "device",
    "data_dir",
    "val_dir",
    "val_labels",
    "probe_iterations",
    "threads",
    "probe",
)


def shared_eval_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of both evaluations that come from the shared ``eval`` flags."""
    return {name: getattr(args, name) for name in SHARED_EVAL_FLAGS}


def check_checkpoint_eval(args: argparse.Namespace) -> None:
    """Refuse the --backbone-only flags with a checkpoint (its data come from the run)."""
    for flag, value in (("--dataset", args.dataset), ("--image-size", args.image_size)):
        if value is not None:
            raise ValueError(
                f"{flag}: expected only with --backbone (a checkpoint's run sets it), got {value}"
            )


def run_backbone_eval(args: argparse.Namespace) -> int:
    from rela_train.evaluate import evaluate_backbone_file

    if args.checkpoint is not None:
        raise ValueError(
            f"--backbone: give a checkpoint or --backbone, not both; got {args.checkpoint} and "
            f"{args.backbone}"
        )
    if args.backbone is None:
        raise ValueError(
            "CKPT: expected a checkpoint, a run directory or --backbone FILE, got none"
        )
    result = evaluate_backbone_file(
        args.backbone,
        dataset=args.dataset,
        image_size=args.image_size,
        **shared_eval_options(args),
    )
    summary = (
        f"{result['backbone']}: {result['arch']} ({result['stem']} stem, width "
        f"{result['width']}) on {result['dataset']} at {result['image_size']} px"
    )
    return print_eval_result(result, summary, as_json=args.json)


def print_eval_result(result: dict, summary: str, *, as_json: bool) -> int:
    """Print an ``eval`` result: one JSON object, or ``summary`` followed by the accuracies."""
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return 0
    linear = "n/a" if result["linear_acc"] is None else f"{100 * result['linear_acc']:.2f}%"
    if result.get("linear_acc_official") is not None:
        linear = (
            f"{100 * result['linear_acc_official']:.2f}% ± "
            f"{100 * result['linear_acc_official_std']:.2f} (official protocol)"
        )
    print(
        f"{summary}; kNN {100 * result['knn_acc']:.2f}%, linear probe {linear} "
        f"({result['train_images']} train / {result['val_images']} test images, "
        f"{result['eval_time']:.0f} s)"
    )
    return 0
