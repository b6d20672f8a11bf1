"""The ReLA study on Fashion-MNIST: does ReLA at 50% match BYOL on all the data?

Trains every row of the grid (``benchmarks/rela_study/grid.py``) through ``python -m rela_train
fit``, two single-thread runs at a time, and reports kNN and linear-probe accuracy (mean +- std
over seeds) against samples seen and training time:

* one record per run in ``OUT/records/`` (atomic), all of them in one JSONL (default
  ``benchmarks/results/study.jsonl``; for ``--quick`` ``OUT/study.jsonl``);
* a markdown table on stdout (``OUT/study.md``) and a PNG with error bars (default
  ``benchmarks/results/study.png``; for ``--quick`` ``OUT/study.png``).

A killed study resumes where it stopped: rerun the same command (finished runs are skipped, a
killed run continues from its last checkpoint). The plan and its estimated time are printed
first.

    .venv/bin/python benchmarks/study_rela.py --quick --out runs/study-quick   # minutes
    .venv/bin/python benchmarks/study_rela.py --out runs/study                 # the grid
    .venv/bin/python benchmarks/study_rela.py --out runs/study --aggregate-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment  # noqa: E402
from rela_study.aggregate import format_markdown, plot_study, summarize  # noqa: E402
from rela_study.grid import (  # noqa: E402
    DEFAULT_SIZES,
    PRETRAIN_CLASSES,
    PRETRAIN_ROW,
    PRIOR_ARCH,
    PRIOR_WIDTH,
    QUICK_SIZES,
    ROW_ORDER,
    build_plan,
    format_plan,
    pretrain_data_dir,
    random_checkpoint,
    with_overrides,
)
from rela_study.records import done_runs, load_records, write_jsonl  # noqa: E402
from rela_study.runner import fit_features, log, main_until_stopped, run_study  # noqa: E402
from rela_study.transport import random_prior_checkpoint, write_class_subset  # noqa: E402

from rela_kernels.atomic_io import atomic_write_text  # noqa: E402

# The name every record of this study carries.
STUDY_NAME = "rela-fashion-mnist"


def _study_rows(records: list[dict]) -> list[dict]:
    """The records of the table and plot (the transported prior's training is a means)."""
    return [record for record in records if record["row"] != PRETRAIN_ROW]


def _seeds(text: str) -> list[int]:
    """``3`` (seeds 0, 1, 2) or a comma-separated list ``0,4,7``."""
    try:
        if "," in text:
            return [int(part) for part in text.split(",")]
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a seed count or a comma-separated list of seeds, got {text!r}"
        ) from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {count}")
    return list(range(count))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="study directory (resumed)")
    parser.add_argument("--quick", action="store_true", help="every row at one seed, tiny sizes")
    parser.add_argument(
        "--seeds", type=_seeds, default=None, help="seed count or list (default 3; quick: 1)"
    )
    parser.add_argument("--epochs", type=_positive, default=None, help="override the epochs")
    parser.add_argument("--jobs", type=_positive, default=2, help="runs side by side")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX directory")
    parser.add_argument("--results", type=Path, default=None, help="JSONL of all records")
    parser.add_argument("--plot", type=Path, default=None, help="PNG with error bars")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    parser.add_argument(
        "--aggregate-only", action="store_true", help="only rebuild table, JSONL and plot"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = with_overrides(QUICK_SIZES if args.quick else DEFAULT_SIZES, args.epochs)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    results = args.results or (args.out / "study.jsonl" if args.quick else RESULTS / "study.jsonl")
    plot = args.plot or (args.out / "study.png" if args.quick else RESULTS / "study.png")
    out = args.out.resolve()
    failed: list[str] = []

    def aggregate() -> None:
        records = load_records(out)
        write_jsonl(results, records)
        summaries = summarize(_study_rows(records), ROW_ORDER)
        if summaries:
            atomic_write_text(out / "study.md", format_markdown(summaries) + "\n")
            plot_study(summaries, plot)

    if not args.aggregate_only:
        features = fit_features()
        runs = build_plan(out, sizes, seeds, features=features, data_dir=args.data_dir)
        print(format_plan(runs, sizes, args.jobs, done_runs(out)), flush=True)
        missing = {"--recipe", "--probe"} - features
        if missing:
            print(
                f"note: this trainer has no {', '.join(sorted(missing))}: runs use its defaults "
                "(L-BFGS probe instead of the official one); the records say so",
                flush=True,
            )
        if args.plan_only:
            return 0
        write_class_subset(args.data_dir, pretrain_data_dir(out), PRETRAIN_CLASSES)
        for seed in seeds:
            random_prior_checkpoint(PRIOR_ARCH, PRIOR_WIDTH, seed, random_checkpoint(out, seed))

        def env() -> dict:
            return {
                **environment("cpu"),
                "threads_per_run": 1,
                "parallel_runs": args.jobs,
                "trainer_features": sorted(features),
                "quick": args.quick,
            }

        failed = run_study(
            runs,
            out,
            study=STUDY_NAME,
            jobs=args.jobs,
            environment=env,
            on_record=aggregate,
            log=log,
        )
        if failed:
            log(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun to retry them")
    aggregate()
    records = _study_rows(load_records(out))
    if records:
        print(format_markdown(summarize(records, ROW_ORDER)))
        print(f"\nrecords: {results}\nplot: {plot}")
    return 1 if failed else 0


if __name__ == "__main__":
    main_until_stopped(main)
