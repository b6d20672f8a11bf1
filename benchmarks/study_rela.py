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
from rela_study import arguments, grid  # noqa: E402
from rela_study.aggregate import format_markdown, plot_study, summarize  # noqa: E402
from rela_study.records import done_runs, load_records, write_jsonl  # noqa: E402
from rela_study.runner import main_until_stopped  # noqa: E402

from rela_kernels.atomic_io import atomic_write_text  # noqa: E402


def _study_rows(records: list[dict]) -> list[dict]:
    """The records of the table and plot (the transported prior's training is a means)."""
    return [record for record in records if record["row"] != grid.PRETRAIN_ROW]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return arguments.study_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = arguments.study_setup(args, "study", RESULTS)
    out = setup.out
    failed: list[str] = []

    def aggregate() -> None:
        records = load_records(out)
        write_jsonl(setup.results, records)
        summaries = summarize(_study_rows(records), grid.ROW_ORDER)
        if summaries:
            atomic_write_text(out / "study.md", format_markdown(summaries) + "\n")
            plot_study(summaries, setup.plot)

    if not args.aggregate_only:
        runs = grid.build_plan(out, setup.sizes, setup.seeds, data_dir=args.data_dir)
        print(grid.format_plan(runs, setup.sizes, args.jobs, done_runs(out)), flush=True)
        if args.plan_only:
            return 0
        arguments.write_prior_files(args, setup)
        failed = arguments.run_records(
            runs, args, setup, study=grid.STUDY_NAME, environment=lambda: environment("cpu"),
            on_record=aggregate,
        )  # fmt: skip
    aggregate()
    records = _study_rows(load_records(out))
    if records:
        print(format_markdown(summarize(records, grid.ROW_ORDER)))
        print(f"\nrecords: {setup.results}\nplot: {setup.plot}")
    return 1 if failed else 0


if __name__ == "__main__":
    main_until_stopped(main)
