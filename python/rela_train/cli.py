"""``rela-train``: the command line of the reference trainer.

The subcommands are the plain list :data:`rela_train.commands.COMMANDS`; this module builds the
parser from it and runs the chosen one.

User errors (bad arguments, missing or mismatched files, ...) print one line on stderr and exit
with status 2, without a traceback; set ``RELA_TRAIN_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from rela_train.commands import COMMANDS
from rela_train.runtime import DistributedError
from rela_train.stop import REQUEUE, StartupStopped

__all__ = ["build_parser", "main", "run", "warn_deprecated"]

USAGE_ERROR = 2
# Exit status when a distributed run fails because another rank died or hung.
DISTRIBUTED_FAILURE = 3


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` names each flag's default, unless its help already says it or there is none
    (``fit``'s configuration flags say theirs: the preset's, else the plain default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rela-train", description="BYOL + ReLA reference trainer and its data tools"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            formatter_class=_DefaultsHelpFormatter,
        )
        command.add_arguments(sub)
    return parser


def warn_deprecated(argv: Sequence[str]) -> list[str]:
    """One line on stderr per earlier flag name used in ``argv`` (they still work); returns
    the lines."""
    lines: list[str] = []
    command = next((c for c in COMMANDS if argv and c.name == argv[0]), None)
    if command is None:
        return lines
    for word in argv[1:]:
        if word == "--":
            break
        name = word.split("=", 1)[0]
        if name in command.deprecated:
            lines.append(
                f"rela-train {command.name}: warning: {name} is deprecated and will be removed; "
                f"use {command.deprecated[name]} (the same setting)"
            )
    if os.environ.get("RANK", "0").strip() in ("", "0"):
        for line in lines:
            print(line, file=sys.stderr)
    return lines


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
    warn_deprecated(list(sys.argv[1:] if argv is None else argv))
    command = next(c for c in COMMANDS if c.name == args.command)
    try:
        return command.run(args)
    except KeyboardInterrupt:
        print(f"rela-train {command.name}: interrupted", file=sys.stderr)
        return 130
    except StartupStopped as stopped:
        print(
            f"rela-train {command.name}: {stopped}; what was finished is kept: run the same "
            "command again to continue",
            file=sys.stderr,
        )
        return REQUEUE
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


def run() -> NoReturn:
    """The process entry point (the ``rela-train`` script and ``python -m rela_train``)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
