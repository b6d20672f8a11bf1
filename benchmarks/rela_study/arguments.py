"""The command line both study scripts share (``study_rela.py``, ``study_switch.py``): the same
flags parsed by the same rules (the trainer's ``rela_train.arg_types``), what they decide (sizes,
seeds, output files), the priors' files, and running the records under the clean-tree rule.

A record says which code measured it: ``environment.git_sha`` with ``dirty`` (uncommitted
changes to tracked files) and ``diff_sha256`` (the hash of ``git diff HEAD``, naming the exact
changes). A full study refuses to run, and to write a record, from a dirty tree unless
``--allow-dirty`` is given; ``--quick`` runs (whose records stay under ``--out``) only mark them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rela_study.grid import (
    DEFAULT_SIZES,
    PRETRAIN_CLASSES,
    PRIOR_ARCH,
    PRIOR_WIDTH,
    QUICK_SIZES,
    RunSpec,
    Sizes,
    pretrain_data_dir,
    random_checkpoint,
    with_overrides,
)
from rela_study.runner import log, run_study
from rela_study.transport import random_prior_checkpoint, write_class_subset
from rela_train.arg_types import non_empty, non_negative_int, positive_int

__all__ = [
    "StudySetup",
    "dirty_refusal",
    "run_records",
    "seed_list",
    "study_parser",
    "study_setup",
    "write_prior_files",
]


def seed_list(text: str) -> list[int]:
    """``3`` (seeds 0, 1, 2) or a comma-separated list ``0,4,7`` (one seed: ``4,``)."""
    try:
        if "," not in text:
            return list(range(positive_int(text)))
        values = [non_negative_int(part) for part in text.split(",") if part]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected a seed count >= 1 or a comma-separated list of seeds >= 0, got {text!r}"
        )
    return values


def study_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every study has; a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="study directory (resumed)")
    parser.add_argument("--quick", action="store_true", help="every row, one seed, tiny sizes")
    parser.add_argument("--seeds", type=seed_list, default=None, help="count or list (default 3)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="override the epochs")
    parser.add_argument("--jobs", type=positive_int, default=2, help="runs side by side")
    parser.add_argument("--data-dir", type=non_empty, default=None, help="Fashion-MNIST IDX dir")
    parser.add_argument("--results", type=Path, default=None, help="JSONL of all records")
    parser.add_argument("--plot", type=Path, default=None, help="PNG")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    parser.add_argument("--aggregate-only", action="store_true", help="only table, JSONL, plot")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write records from a tree with uncommitted changes (marked dirty, with the diff's "
        "hash); without it a full study refuses",
    )
    return parser


def dirty_refusal(environment: dict[str, Any], args: argparse.Namespace) -> str | None:
    """Why this study may not write a record from the tree ``environment`` describes, or None."""
    if not environment.get("dirty") or args.allow_dirty or args.quick:
        return None
    return (
        f"the tree has uncommitted changes (git {environment.get('git_sha')}, diff sha256 "
        f"{environment.get('diff_sha256')}); commit them and rerun, or pass --allow-dirty to "
        "write records marked dirty"
    )


@dataclass(frozen=True)
class StudySetup:
    """What a study's flags decide: the sizes, the seeds, the study directory and where the
    records' JSONL and the plot go (``--quick``: under ``--out``, never the committed ones)."""

    sizes: Sizes
    seeds: list[int]
    out: Path
    results: Path
    plot: Path


def study_setup(args: argparse.Namespace, name: str, results_dir: Path) -> StudySetup:
    """The setup of study ``name`` (its files: ``NAME.jsonl``, ``NAME.png``) from its flags."""
    where = args.out if args.quick else results_dir
    return StudySetup(
        sizes=with_overrides(QUICK_SIZES if args.quick else DEFAULT_SIZES, args.epochs),
        seeds=args.seeds or ([0] if args.quick else [0, 1, 2]),
        out=args.out.resolve(),
        results=args.results or where / f"{name}.jsonl",
        plot=args.plot or where / f"{name}.png",
    )


def write_prior_files(args: argparse.Namespace, setup: StudySetup) -> None:
    """The files the studies' priors read, before any run needs them: the transported prior's
    class subset and a seeded random network per seed (each skipped when it exists)."""
    write_class_subset(args.data_dir, pretrain_data_dir(setup.out), PRETRAIN_CLASSES)
    for seed in setup.seeds:
        random_prior_checkpoint(PRIOR_ARCH, PRIOR_WIDTH, seed, random_checkpoint(setup.out, seed))


def run_records(
    runs: list[RunSpec],
    args: argparse.Namespace,
    setup: StudySetup,
    *,
    study: str,
    environment: Callable[[], dict[str, Any]],
    on_record: Callable[[], None],
    python: str = sys.executable,
) -> list[str]:
    """Run ``runs`` (:func:`~rela_study.runner.run_study`) with the flags' jobs and clean-tree
    rule; every record's environment also says how the runs shared the machine. Returns the
    failed runs (logged)."""

    def env() -> dict[str, Any]:
        shared = {"threads_per_run": 1, "parallel_runs": args.jobs, "quick": args.quick}
        return {**environment(), **shared}

    refusal = dirty_refusal(env(), args)
    if refusal is not None:
        raise SystemExit(f"{study}: {refusal}")
    failed = run_study(
        runs, setup.out, study=study, jobs=args.jobs, python=python, environment=env,
        refuse_dirty=not (args.allow_dirty or args.quick), on_record=on_record, log=log,
    )  # fmt: skip
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun to retry them")
    return failed
