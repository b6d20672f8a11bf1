"""``rela-train``: the command line of the reference trainer.

Subcommands live in a registry: each is a :class:`Command` (name, help, an ``add_arguments``
function and a ``run`` function returning an exit code) added with :func:`register`. Adding a
subcommand means writing those two functions and one ``register`` call.

User errors (bad arguments, missing or mismatched files, ...) print one line on stderr and exit
with status 2, without a traceback; set ``RELA_TRAIN_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from rela_train.arg_types import non_empty, non_negative_int
from rela_train.arg_types import positive_int as _positive_int

_non_negative_int = non_negative_int  # the names the embed flags use

__all__ = ["COMMANDS", "Command", "build_parser", "main", "register"]

USAGE_ERROR = 2
# Exit status when a distributed run fails because another rank died or hung.
DISTRIBUTED_FAILURE = 3


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    if command.name in COMMANDS:
        raise ValueError(f"rela-train: subcommand {command.name!r} is already registered")
    COMMANDS[command.name] = command
    return command


# -------------------------------------------------------------------------------------------------
# embed
# -------------------------------------------------------------------------------------------------


def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", help="image folder (class subfolders of images); required unless --verify"
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
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    parser.add_argument(
        "--workers",
        type=_non_negative_int,
        default=None,
        help="image decoding processes (default min(8, CPUs))",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dim",
        type=_positive_int,
        default=None,
        help="transport width d (default min(256, D, N - 1))",
    )
    parser.add_argument(
        "--chunk-rows",
        type=_positive_int,
        default=None,
        help="rows per durable chunk of a new store",
    )
    parser.add_argument(
        "--input-size", type=_positive_int, default=None, help="override the crop size"
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


def _embed_run(args: argparse.Namespace) -> int:
    from rela_train.prior.embedding import embed, verify_store

    if args.verify:
        report = verify_store(args.out)
        print(report.summary())
        return 0 if report.ok else 1
    given = (("--data", args.data), ("--prior", args.prior))
    missing = [flag for flag, value in given if not value]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required (unless --verify)")
    result = embed(
        args.data,
        args.prior,
        args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        dim=args.dim,
        chunk_rows=args.chunk_rows,
        input_size=args.input_size,
        normalize=args.normalize,
        progress=not args.no_progress,
        repair=args.repair,
    )
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
    return 0


register(
    Command(
        "embed",
        "embed an image folder with a prior model and fit the PCA-whitening transport",
        _embed_arguments,
        _embed_run,
    )
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


register(
    Command(
        "transportability",
        "held-out R^2 of a linear map from one prior's embeddings to another's (same data)",
        _transportability_arguments,
        _transportability_run,
    )
)


# fit, eval, report, demo: the trainer's commands live in rela_train.train_commands.
from rela_train.runtime import DistributedError  # noqa: E402
from rela_train.train_commands import register_train_commands  # noqa: E402

register_train_commands(sys.modules[__name__])


# -------------------------------------------------------------------------------------------------
# entry point
# -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rela-train", description="BYOL + ReLA reference trainer and its data tools"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
    return parser


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if "Original Traceback" in str(error):
        return lines[-1]  # re-raised from a DataLoader worker: the last line is the error itself
    return " ".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    try:
        return command.run(args)
    except KeyboardInterrupt:
        print(f"rela-train {command.name}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        if os.environ.get("RELA_TRAIN_DEBUG"):
            raise
        print(f"rela-train {command.name}: error: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
    except DistributedError as error:
        if os.environ.get("RELA_TRAIN_DEBUG"):
            raise
        print(f"rela-train {command.name}: error: {_one_line(error)}", file=sys.stderr)
        return DISTRIBUTED_FAILURE


if __name__ == "__main__":
    sys.exit(main())
