"""The trainer's subcommands: ``fit``, ``eval``, ``report``, ``demo``.

:func:`register_train_commands` adds them to :mod:`rela_train.cli`'s registry. Heavy imports
(the engine, matplotlib) happen inside the ``run`` functions, so ``rela-train --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from types import ModuleType

from rela_train.arg_types import (
    device,
    fraction_upper_closed,
    non_empty,
    non_negative_int,
    positive_int,
)
from rela_train.config import RESUME_SETTINGS, TrainConfig, add_config_arguments

__all__ = ["register_train_commands"]

# Exit status of a run stopped by SIGINT/SIGTERM after writing its checkpoint (128 + SIGINT).
INTERRUPTED = 128 + signal.SIGINT


# -------------------------------------------------------------------------------------------------
# fit
# -------------------------------------------------------------------------------------------------


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    from rela_train.presets import PRESETS

    parser.add_argument(
        "--preset", default=None, help=f"starting configuration: {', '.join(PRESETS)}"
    )
    parser.add_argument(
        "--out", type=non_empty, default=None, help="run directory (default runs/<name>-<time>)"
    )
    parser.add_argument(
        "--resume",
        metavar="RUN",
        type=non_empty,
        default=None,
        help="continue the run in RUN from its last checkpoint (its config.json is used)",
    )
    add_config_arguments(parser)


def _fit_run(args: argparse.Namespace) -> int:
    from rela_train.config import config_from_args
    from rela_train.fit import default_run_dir, fit
    from rela_train.presets import get_preset

    if args.resume is not None:
        given = [
            f.name
            for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name) is not None and f.name not in RESUME_SETTINGS
        ]
        if given or args.preset is not None or args.out is not None:
            flags = ", ".join("--" + n.replace("_", "-") for n in given) or "--preset/--out"
            raise ValueError(f"--resume continues a run with its saved configuration; drop {flags}")
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"--resume: {run_dir} is not a run directory (no config.json)")
        config = TrainConfig.load(run_dir / "config.json")
        changes = {n: getattr(args, n) for n in RESUME_SETTINGS if getattr(args, n) is not None}
        result = fit(config.replace(**changes), run_dir, resume=True)
    else:
        config = config_from_args(get_preset(args.preset), args)
        if args.out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "--out: a distributed run needs an explicit run directory, the same for every "
                "rank (on a file system all nodes mount)"
            )
        run_dir = Path(args.out) if args.out is not None else default_run_dir(config)
        result = fit(config, run_dir)
    if result.status != "finished":
        return 128 + (result.signal or signal.SIGINT)
    summary = result.summary
    if not summary:  # ranks other than 0 of a distributed run
        return 0
    print(
        json.dumps(
            {
                k: summary[k]
                for k in ("run_dir", "knn_acc", "linear_acc", "samples_seen", "train_time")
            }
            | {k: summary[k] for k in ("linear_acc_official",) if summary.get(k) is not None}
        )
    )
    return 0


# -------------------------------------------------------------------------------------------------
# eval
# -------------------------------------------------------------------------------------------------


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", metavar="CKPT", type=non_empty, help="a checkpoint file or a run directory"
    )
    parser.add_argument(
        "--device", type=device, default="auto", help="auto (default), cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--data-dir", type=non_empty, default=None, help="override the training data location"
    )
    parser.add_argument(
        "--val-dir", type=non_empty, default=None, help="override the evaluation folder"
    )
    parser.add_argument(
        "--probe-iterations",
        type=non_negative_int,
        default=None,
        help="L-BFGS iterations, or the official probe's epochs (0: no probe; default: the "
        "run's --probe-epochs)",
    )
    parser.add_argument(
        "--probe",
        choices=("lbfgs", "official", "none"),
        default=None,
        help="linear probe: lbfgs (standardised features), official (the official ReLA "
        "protocol: Adam 3e-4, batch 128, raw features, mean of the last 3 epochs) or none "
        "(default: the run's --probe)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _eval_run(args: argparse.Namespace) -> int:
    from rela_train.fit import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        device=args.device,
        data_dir=args.data_dir,
        val_dir=args.val_dir,
        probe_iterations=args.probe_iterations,
        threads=args.threads,
        probe=args.probe,
    )
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        linear = "n/a" if result["linear_acc"] is None else f"{100 * result['linear_acc']:.2f}%"
        if result.get("linear_acc_official") is not None:
            linear = (
                f"{100 * result['linear_acc_official']:.2f}% ± "
                f"{100 * result['linear_acc_official_std']:.2f} (official protocol)"
            )
        print(
            f"{result['checkpoint']}: epoch {result['epoch']}, step {result['step']}, "
            f"{result['samples_seen']} samples seen; kNN {100 * result['knn_acc']:.2f}%, "
            f"linear probe {linear} ({result['train_images']} train / {result['val_images']} "
            f"test images, {result['eval_time']:.0f} s)"
        )
    return 0


# -------------------------------------------------------------------------------------------------
# report
# -------------------------------------------------------------------------------------------------


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", metavar="RUN", nargs="+", help="run directories")
    parser.add_argument(
        "--plot", default="report.png", help="PNG to write (default report.png; '' for none)"
    )


def _report_run(args: argparse.Namespace) -> int:
    from rela_train.report import format_table, load_run, plot_runs

    runs = [load_run(path) for path in args.runs]
    print(format_table(runs))
    if args.plot:
        print(f"plot: {plot_runs(runs, args.plot)}")
    return 0


# -------------------------------------------------------------------------------------------------
# demo
# -------------------------------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=non_empty, default=None, help="directory of the two runs and the plot"
    )
    parser.add_argument(
        "--data-dir",
        type=non_empty,
        default=None,
        help="Fashion-MNIST IDX directory (default: Debian's)",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=None, help="override the preset's epochs"
    )
    parser.add_argument(
        "--budget", type=fraction_upper_closed, default=0.5, help="ReLA run's budget (0.5)"
    )
    parser.add_argument(
        "--prior",
        type=non_empty,
        default="pixels:16",
        help="ReLA prior spec (pixels:16; a torchscript:PATH prior runs the archive's code)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (preset: 2)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _demo_run(args: argparse.Namespace) -> int:
    from rela_train.demo import run_demo

    try:
        run_demo(
            args.out,
            data_dir=args.data_dir,
            epochs=args.epochs,
            budget=args.budget,
            prior=args.prior,
            threads=args.threads,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print("rela-train demo: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0


def register_train_commands(cli: ModuleType | None = None) -> None:
    """Add ``fit``, ``eval``, ``report`` and ``demo`` to the registry of ``cli`` (default
    :mod:`rela_train.cli`); idempotent: commands already registered are left alone.

    cli.py passes itself, so the commands land in the right registry even when it runs as
    ``__main__``.
    """
    if cli is None:
        from rela_train import cli

    for name, help_text, arguments, run in (
        ("fit", "train BYOL (+ ReLA, + data selection); resumable", _fit_arguments, _fit_run),
        ("eval", "kNN and linear-probe accuracy of a checkpoint", _eval_arguments, _eval_run),
        ("report", "compare runs in a table and a plot", _report_arguments, _report_run),
        (
            "demo",
            "Fashion-MNIST: BYOL on all data vs BYOL + ReLA on 50%% of it, in minutes on a CPU",
            _demo_arguments,
            _demo_run,
        ),
    ):
        if name not in cli.COMMANDS:
            cli.register(cli.Command(name, help_text, arguments, run))
