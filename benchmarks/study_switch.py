"""The switch study: what the ReLA -> BYOL switch costs, and which transition keeps the ReLA
phase's gain (docs/switch.md).

Same data, recipe and sizes as the ReLA study (``study_rela.py``), so that the rows compare:
Fashion-MNIST, 18,000 training images, 15 epochs, batch 32, official recipe, ReLA 50% with the
pixel prior. Parts
(``benchmarks/rela_study/switch_grid.py``), run in this order, two single-thread runs at a time:

* ``factors``: one transition at a time (hard, reset-target, warm-heads, keep-views, lr-drop,
  blend), kNN on the 5,000-image bank every 100 steps from 300 before the switch to 1,000 after;
* ``horizon``: BYOL 100% and ReLA 50% that never switches;
* ``views`` (only with ``--parts``): BYOL on all data from step 0 of a ReLA run, on ReLA's views
  and on BYOL's own: whether ``keep-views`` is a better transition or milder views suit the data;
* ``long``: BYOL 100%, ReLA 50% hard, with ``--best``, and never, at 3 x the epochs;
* ``res28``, ``transfer``, ``decay`` (only with ``--parts``): the same questions at 28-px crops,
  with a prior from another distribution (scikit-learn's digits) beside a random network, the
  pixels and a Fashion-MNIST-trained one (with their transportability R^2), and the official
  recipe's weight decay on biases and norms; ``res28long`` (only with ``--parts``): ReLA 50%
  hard and with ``--best`` at 28 px and 3 x the epochs, the default rule's long half there.

Outputs: one record per run in ``OUT/records/`` (atomic), all of them in one JSONL (default
``benchmarks/results/switch.jsonl``, ``switch-beyond.jsonl`` for the res28, transfer and decay
parts alone; ``--quick``: ``OUT/switch.jsonl``), a markdown table with the
drop around the switch (``OUT/switch.md``, also printed) and a plot of kNN against steps since the
switch with bands over seeds (default ``benchmarks/results/switch.png``). A killed study resumes
where it stopped: rerun the same command.

    .venv/bin/python benchmarks/study_switch.py --quick --out runs/switch-quick    # minutes
    .venv/bin/python benchmarks/study_switch.py --out runs/switch                  # the grid
    .venv/bin/python benchmarks/study_switch.py --out runs/switch --aggregate-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment  # noqa: E402
from rela_study import arguments  # noqa: E402
from rela_study.digits_prior import train_digits_prior  # noqa: E402
from rela_study.grid import (  # noqa: E402
    PRETRAIN_ROW,
    format_plan,
)
from rela_study.records import done_runs, load_records, write_jsonl  # noqa: E402
from rela_study.runner import log, main_until_stopped  # noqa: E402
from rela_study.switch_aggregate import (  # noqa: E402
    default_verdict,
    format_paired_markdown,
    format_switch_markdown,
    plot_switch,
    summarize_switch,
)
from rela_study.switch_grid import (  # noqa: E402
    DEFAULT_PARTS,
    PARTS,
    QUICK_STEPS,
    RES28_HARD_ROW,
    RES28_LONG_BEST_ROW,
    RES28_LONG_HARD_ROW,
    SEED_MAJOR_PARTS,
    STUDY_NAME,
    STUDY_STEPS,
    build_switch_plan,
    digits_checkpoint,
    switch_rows,
)
from rela_study.transfer import transfer_markdown  # noqa: E402
from rela_train.transition import MEASURED_BEST  # noqa: E402

from rela_kernels.atomic_io import atomic_write_text  # noqa: E402

HARD_ROW = "switch-a-hard"


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(text.split(","))
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown)}; expected some of {', '.join(PARTS)}"
        )
    return parts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments.study_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--long-seeds",
        type=arguments.seed_list,
        default=None,
        help="the long horizon's (default: first seed)",
    )
    parser.add_argument(
        "--parts", type=_parts, default=DEFAULT_PARTS,
        help=f"comma-separated, of {', '.join(PARTS)} (default: {','.join(DEFAULT_PARTS)})",
    )  # fmt: skip
    parser.add_argument(
        "--rows", type=lambda text: text.split(","), default=None,
        help="only these rows (comma-separated names; default: every row of --parts)",
    )  # fmt: skip
    parser.add_argument(
        "--best", default=None, help=f"the long horizon's best row's transition ({MEASURED_BEST})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, python: str = sys.executable) -> int:
    """The study; ``python`` is the interpreter that runs ``-m rela_train fit``."""
    args = parse_args(argv)
    # The later parts keep their own records file: a study directory holding only them must not
    # replace the earlier parts' committed records.
    beyond = set(args.parts) <= set(SEED_MAJOR_PARTS)
    setup = arguments.study_setup(args, "switch-beyond" if beyond else "switch", RESULTS)
    sizes, seeds, out = setup.sizes, setup.seeds, setup.out
    steps = QUICK_STEPS if args.quick else STUDY_STEPS
    # The transition the default uses in a run that switches (docs/switch.md, "The default").
    best = args.best or MEASURED_BEST
    rows = switch_rows(steps, best)
    order = [row.name for row in rows]
    candidates = [row.name for row in rows if row.part == "factors" and row.name != HARD_ROW]
    candidates += [row.name for row in rows if row.part == "decay"]
    res28 = [row.name for row in rows if row.part == "res28" and row.name != RES28_HARD_ROW]
    # The rule at 28 px: the row of the best transition there, and the long rows of both.
    res28_best = [row.name for row in rows if row.part == "res28" and row.transition == best]
    res28_long = {RES28_HARD_ROW: RES28_LONG_HARD_ROW}
    res28_long.update({name: RES28_LONG_BEST_ROW for name in res28_best})
    # The long horizon's "best" row runs --best: it pairs with the factor row of that transition.
    best_row = next((r.name for r in rows if r.part == "factors" and r.transition == best), None)
    long_pairs = {HARD_ROW: "long-rela-50-hard"}
    if best_row is not None:
        long_pairs[best_row] = "long-rela-50-best"

    def aggregate() -> None:
        records = load_records(out)
        write_jsonl(setup.results, records)
        summaries = summarize_switch([r for r in records if r["row"] != PRETRAIN_ROW], order)
        if summaries:
            table = format_switch_markdown(summaries)
            paired = format_paired_markdown(summaries, HARD_ROW, candidates)
            body = f"{table}\n\n{paired}\n" if paired else f"{table}\n"
            rows_present = {summary.row for summary in summaries}
            if HARD_ROW in rows_present:
                verdict = default_verdict(summaries, HARD_ROW, candidates, long_pairs)
                body += f"\n{verdict}\n"
            paired28 = format_paired_markdown(summaries, RES28_HARD_ROW, res28)
            if paired28:
                body += f"\n28 px, seed by seed:\n\n{paired28}\n"
            if RES28_HARD_ROW in rows_present:
                verdict28 = default_verdict(summaries, RES28_HARD_ROW, res28_best, res28_long)
                body += f"\nThe default rule at 28 px: {verdict28}\n"
            transfer = transfer_markdown(summaries, out)
            if transfer:
                body += f"\n{transfer}\n"
            atomic_write_text(out / "switch.md", body)
            plot_switch(summaries, setup.plot, steps.eval_every)

    failed: list[str] = []
    if not args.aggregate_only:
        runs = build_switch_plan(
            sizes, steps, seeds, parts=args.parts, long_seeds=args.long_seeds, best=best,
            data_dir=args.data_dir,
            switch="const:0.5" if args.quick else None, out=out,
        )  # fmt: skip
        if args.rows is not None:
            unknown = sorted(set(args.rows) - set(order))
            if unknown:
                raise SystemExit(f"study_switch: --rows: unknown row(s) {', '.join(unknown)}")
            runs = [run for run in runs if run.row in args.rows]
        print(format_plan(runs, sizes, args.jobs, done_runs(out), title="Switch study"), flush=True)
        if args.plan_only:
            return 0
        if "transfer" in args.parts:
            # The transfer part's prior files: written before any run needs them (each is
            # skipped when it exists; all are seeded).
            arguments.write_prior_files(args, setup)
            train_digits_prior(digits_checkpoint(out), epochs=2 if args.quick else 15, log=log)
        failed = arguments.run_records(
            runs, args, setup, study=STUDY_NAME, python=python, on_record=aggregate,
            environment=lambda: {**environment("cpu"), "best": best},
        )  # fmt: skip
    aggregate()
    if (out / "switch.md").is_file():
        print((out / "switch.md").read_text(encoding="utf-8"))
        print(f"records: {setup.results}\nplot: {setup.plot}")
    return 1 if failed else 0


if __name__ == "__main__":
    main_until_stopped(main)
