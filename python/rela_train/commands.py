"""Every ``rela-train`` subcommand, as a :class:`Command` in the plain list :data:`COMMANDS`
(in ``--help`` order) that :mod:`rela_train.cli` reads.

Adding a subcommand means writing its ``add_arguments`` and ``run`` functions and one entry in
:data:`COMMANDS`. Heavy imports (the engine, the prior models, matplotlib) happen inside the
``run`` functions, so ``rela-train --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rela_train.arg_types import (
    device,
    fraction_upper_closed,
    non_empty,
    non_negative_int,
    positive_float,
    positive_int,
)
from rela_train.config import RESUME_SETTINGS, TrainConfig, add_config_arguments
from rela_train.export_commands import (
    EXPORT_HELP,
    add_backbone_eval_arguments,
    check_checkpoint_eval,
    export_arguments,
    export_run,
    print_eval_result,
    run_backbone_eval,
    shared_eval_options,
)
from rela_train.stop import REQUEUE, stop_raises

__all__ = ["COMMANDS", "INTERRUPTED", "Command", "add_dry_run_arguments"]

# Exit status of a run stopped by SIGINT after writing its checkpoint (128 + SIGINT); stopped by
# SIGUSR1 or SIGTERM it is rela_train.stop.REQUEUE.
INTERRUPTED = 128 + signal.SIGINT


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments`` fills its parser, ``run`` returns the exit status;
    ``deprecated`` maps earlier flag names, which still work, to the current ones."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    deprecated: dict[str, str] = dataclasses.field(default_factory=dict)


def add_dry_run_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"check everything a start checks, print the resolved plan ({what}) and exit 0 "
        "without training or writing anything",
    )
    parser.add_argument(
        "--world-size",
        metavar="N",
        type=positive_int,
        default=None,
        help="with --dry-run: plan for N ranks from one process (default: torchrun's "
        "WORLD_SIZE, else 1)",
    )


def _dry_run_world(args: argparse.Namespace) -> int | None:
    """The world size to plan for with --dry-run, else None (a real start)."""
    from rela_train.plan import planned_world_size

    if not args.dry_run:
        if args.world_size is not None:
            raise ValueError(
                "--world-size: only with --dry-run (torchrun sets the world size of a real run)"
            )
        return None
    return planned_world_size(args.world_size)


def _print_notes(notes: list[str]) -> None:
    if notes and os.environ.get("RANK", "0").strip() in ("", "0"):
        print("\n".join(notes), file=sys.stderr)


def _print_plan(plan) -> int:
    if os.environ.get("RANK", "0").strip() in ("", "0"):  # one plan per job
        print("\n".join(plan.lines()))
    return 0


# -------------------------------------------------------------------------------------------------
# embed
# -------------------------------------------------------------------------------------------------


def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        "--data",
        dest="data",
        help="image folder (class subfolders of images); required unless --verify (--data: its "
        "earlier name)",
    )
    parser.add_argument(
        "--prior",
        help="required unless --verify; prior spec: torchscript:PATH, checkpoint:ARCH:PATH, "
        "random:ARCH[:SEED], pixels[:SIZE], embeddings:PATH, timm:NAME[:WEIGHTS], "
        "open_clip:ARCH:PRETRAINED (a torchscript:PATH prior runs the archive's code: use only "
        "archives you trust)",
    )
    parser.add_argument(
        "--out", required=True, help="embedding store directory (resumed if it exists)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per forward pass of the prior"
    )
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="image decoding processes (default min(8, CPUs))",
    )
    parser.add_argument(
        "--device", type=device, default="auto", help="auto (default), cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--dim",
        type=positive_int,
        default=None,
        help="transport width d (default min(256, D, N - 1))",
    )
    parser.add_argument(
        "--chunk-rows",
        type=positive_int,
        default=None,
        help="rows per durable chunk of a new store",
    )
    parser.add_argument(
        "--input-size", type=positive_int, default=None, help="override the crop size"
    )
    parser.add_argument(
        "--normalize",
        choices=("imagenet", "clip", "none"),
        default=None,
        help="override the normalisation",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    check = parser.add_mutually_exclusive_group()
    check.add_argument(
        "--verify",
        action="store_true",
        help="only check the store's chunk checksums: print a one-line summary, exit 1 if any "
        "rows are damaged",
    )
    check.add_argument(
        "--repair",
        action="store_true",
        help="recompute the chunks that fail their checksum (then finish the store as usual)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=1800.0,
        help="under torchrun: seconds a rank may give no sign of life before the others stop "
        "with a message saying how to resume (default 1800)",
    )
    add_dry_run_arguments(parser, "images, chunks per rank, store state, transport width")


def _embed_run(args: argparse.Namespace) -> int:
    from rela_train.prior.embedding import embed, verify_store

    world = _dry_run_world(args)
    if args.verify:
        report = verify_store(args.out)
        print(report.summary())
        return 0 if report.ok else 1
    given = (("--data-dir", args.data), ("--prior", args.prior))
    missing = [flag for flag, value in given if not value]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required (unless --verify)")
    if world is not None:
        from rela_train.plan import plan_embed

        return _print_plan(plan_embed(args, world=world))
    # SIGUSR1/SIGTERM stop the embedding at once (stop.stop_raises): the finished chunks stay,
    # the command exits with REQUEUE and the same command continues.
    with stop_raises():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return _embed_distributed(args)
        result = embed(args.data, args.prior, args.out, **_embed_options(args))
    _print_embed_result(result)
    return 0


# The `embed` flags passed on to prior.embedding.embed as they are.
_EMBED_OPTIONS = (
    "batch_size", "workers", "device", "dim", "chunk_rows", "input_size", "normalize", "repair"
)  # fmt: skip


def _embed_options(args: argparse.Namespace, **changes: Any) -> dict[str, Any]:
    """``embed``'s keyword arguments from the flags, with ``changes`` applied."""
    options = {name: getattr(args, name) for name in _EMBED_OPTIONS}
    return {**options, "progress": not args.no_progress, **changes}


def _embed_distributed(args: argparse.Namespace) -> int:
    """``embed`` on every rank of a torchrun job: each computes its share of the chunks."""
    import shlex

    import torch

    from rela_train.peers import Peers
    from rela_train.prior.embedding import embed
    from rela_train.runtime import resolve_device, setup

    device = resolve_device(args.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    ctx = setup(device, args.dist_timeout)
    workers = args.workers
    if workers is None:  # the node's decoding processes, shared among its ranks
        per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        workers = min(8, max(1, (os.cpu_count() or 1) // per_node))
    command = ["rela-train", "embed", "--data-dir", args.data, "--prior", args.prior]
    command += ["--out", args.out, "--batch-size", str(args.batch_size)]
    for flag in ("chunk_rows", "input_size", "normalize", "dim"):
        if getattr(args, flag) is not None:
            command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    advice = (
        f"Every chunk the ranks finished is kept in {args.out}; resume with "
        f"`{shlex.join(command)}`, alone or under torchrun with any number of ranks"
    )
    try:
        with Peers(ctx, f"embedding into {args.out}", advice) as peers:
            options = _embed_options(
                args, workers=workers, device=device, peers=peers,
                progress=not args.no_progress and ctx.main,
            )  # fmt: skip
            result = embed(args.data, args.prior, args.out, **options)
    finally:
        ctx.close()
    if ctx.main:
        _print_embed_result(result)
    else:
        print(f"rank {ctx.rank} of {ctx.world}: {result.computed_rows} rows computed")
    return 0


def _print_embed_result(result) -> None:
    extra = "".join(
        [
            f", {result.repaired_rows} repaired" if result.repaired_rows else "",
            f", {result.skipped_rows} unreadable images skipped" if result.skipped_rows else "",
        ]
    )
    print(
        f"{result.store}: {result.rows} x {result.prior_dim} embeddings "
        f"({result.computed_rows} computed now{extra}); transport {result.prior_dim} -> "
        f"{result.dim} in {result.transport}"
    )


EMBED = Command(
    "embed",
    "embed an image folder with a prior model and fit the PCA-whitening transport",
    _embed_arguments,
    _embed_run,
    deprecated={"--data": "--data-dir"},
)


# -------------------------------------------------------------------------------------------------
# transportability
# -------------------------------------------------------------------------------------------------


def _transportability_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--a", required=True, type=non_empty, help="embedding store of the source prior"
    )
    parser.add_argument(
        "--b", required=True, type=non_empty, help="embedding store of the target prior (same data)"
    )
    # --ridge and --holdout are checked by transportability() itself, with the same message for
    # the library and the command line.
    parser.add_argument(
        "--ridge", type=float, default=1e-3, help="ridge penalty, relative to A's mean variance"
    )
    parser.add_argument(
        "--holdout", type=float, default=0.2, help="held-out fraction of the rows, in (0, 1)"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the train/held-out split"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _transportability_run(args: argparse.Namespace) -> int:
    from rela_train.prior.transportability import transportability

    result = transportability(
        args.a, args.b, ridge=args.ridge, holdout=args.holdout, seed=args.seed
    )
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, **asdict(result)}, sort_keys=True))
    else:
        print(
            f"held-out R^2 of the linear map A -> B: {result.r2:.4f}  (A: D={result.a_dim}, "
            f"B: D={result.b_dim}; {result.train_rows} training / {result.test_rows} held-out "
            f"rows; ridge {result.ridge:g}, seed {result.seed})"
        )
    return 0


TRANSPORTABILITY = Command(
    "transportability",
    "held-out R^2 of a linear map from one prior's embeddings to another's (same data)",
    _transportability_arguments,
    _transportability_run,
)


# -------------------------------------------------------------------------------------------------
# fit
# -------------------------------------------------------------------------------------------------


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    from rela_train.presets import PRESETS

    parser.add_argument(
        "--preset",
        default=None,
        help=f"starting configuration: {', '.join(PRESETS)} (default: none, the plain "
        "defaults below)",
    )
    parser.add_argument(
        "--out", type=non_empty, default=None, help="run directory (default runs/<name>-<time>)"
    )
    parser.add_argument(
        "--resume",
        metavar="RUN|auto",
        type=non_empty,
        default=None,
        help="continue the run in RUN from its last checkpoint (its config.json is used); "
        "auto: continue the run in --out if it holds a checkpoint, else start it there (one "
        "command for the first start and every requeue; the given settings must be the run's; "
        "default: start a new run)",
    )
    add_config_arguments(parser)
    add_dry_run_arguments(
        parser, "per-rank batch, accumulation, steps, evaluation cost, prior store, transition"
    )


def _fit_run(args: argparse.Namespace) -> int:
    from rela_train.build import adapt_batch_to_world
    from rela_train.checkpoint import load_run_config
    from rela_train.config import config_from_args
    from rela_train.plan import plan_fit, planned_world_size
    from rela_train.presets import get_preset
    from rela_train.runs import default_run_dir, fit

    planned = _dry_run_world(args)
    world = planned if planned is not None else planned_world_size(None)
    notes: list[str] = []
    if args.resume == "auto":
        if args.out is None:
            raise ValueError(
                "--resume auto: needs --out DIR, the run directory to continue or start"
            )
        config = config_from_args(get_preset(args.preset), args)
        if args.batch_size is None:  # the preset's per-rank batch follows the world size
            config, note = adapt_batch_to_world(config, world)
            notes += [note] if note is not None else []
        if planned is not None:
            return _print_plan(
                plan_fit(config, Path(args.out), world=world, resume="auto", notes=notes)
            )
        _print_notes(notes)
        result = fit(config, Path(args.out), resume="auto")
    elif args.resume is not None:
        given = [
            f.name
            for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name) is not None and f.name not in RESUME_SETTINGS
        ]
        if given or args.preset is not None or args.out is not None:
            flags = ", ".join("--" + n.replace("_", "-") for n in given) or "--preset/--out"
            raise ValueError(f"--resume continues a run with its saved configuration; drop {flags}")
        run_dir = Path(args.resume)
        changes = {n: getattr(args, n) for n in RESUME_SETTINGS if getattr(args, n) is not None}
        config = load_run_config(run_dir, changes)
        if planned is not None:
            return _print_plan(plan_fit(config, run_dir, world=world, resume=True))
        result = fit(config, run_dir, resume=True)
    else:
        config = config_from_args(get_preset(args.preset), args)
        if args.out is None and world > 1:
            raise ValueError(
                "--out: a distributed run needs an explicit run directory, the same for every "
                "rank (on a file system all nodes mount)"
            )
        if args.batch_size is None:  # the preset's per-rank batch follows the world size
            config, note = adapt_batch_to_world(config, world)
            notes += [note] if note is not None else []
        run_dir = Path(args.out) if args.out is not None else default_run_dir(config)
        if planned is not None:
            return _print_plan(plan_fit(config, run_dir, world=world, notes=notes))
        _print_notes(notes)
        result = fit(config, run_dir, preset=args.preset)
    if result.status != "finished":  # a checkpoint was written: run the same command again
        return INTERRUPTED if result.signal == signal.SIGINT else REQUEUE
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


FIT = Command(
    "fit",
    "train BYOL (+ ReLA, + data selection); resumable",
    _fit_arguments,
    _fit_run,
    deprecated={
        alias: "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(TrainConfig)
        for alias in f.metadata.get("aliases", ())
    },
)


# -------------------------------------------------------------------------------------------------
# eval
# -------------------------------------------------------------------------------------------------


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        type=non_empty,
        nargs="?",
        default=None,
        help="a checkpoint file or a run directory (or give --backbone)",
    )
    add_backbone_eval_arguments(parser)
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
        "--val-labels",
        type=non_empty,
        default=None,
        help="override the labels file of a flat evaluation folder (see fit --val-labels)",
    )
    parser.add_argument(
        "--probe-epochs",
        "--probe-iterations",
        dest="probe_iterations",
        type=non_negative_int,
        default=None,
        help="L-BFGS iterations, or the official probe's epochs (0: no probe; default: the "
        "run's --probe-epochs; --probe-iterations: its earlier name)",
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
    from rela_train.evaluate import evaluate_checkpoint

    if args.backbone is not None or args.checkpoint is None:
        return run_backbone_eval(args)
    check_checkpoint_eval(args)
    result = evaluate_checkpoint(args.checkpoint, **shared_eval_options(args))
    summary = (
        f"{result['checkpoint']}: epoch {result['epoch']}, step {result['step']}, "
        f"{result['samples_seen']} samples seen"
    )
    return print_eval_result(result, summary, as_json=args.json)


EVAL = Command(
    "eval",
    "kNN and linear-probe accuracy of a checkpoint",
    _eval_arguments,
    _eval_run,
    deprecated={"--probe-iterations": "--probe-epochs"},
)


EXPORT = Command("export", EXPORT_HELP, export_arguments, export_run)


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


REPORT = Command("report", "compare runs in a table and a plot", _report_arguments, _report_run)


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


DEMO = Command(
    "demo",
    "Fashion-MNIST: BYOL on all data vs BYOL + ReLA on 50%% of it, in minutes on a CPU",
    _demo_arguments,
    _demo_run,
)


# Every subcommand, in `rela-train --help` order.
COMMANDS: tuple[Command, ...] = (EMBED, TRANSPORTABILITY, FIT, EVAL, EXPORT, REPORT, DEMO)
