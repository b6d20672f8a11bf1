"""The command line both study scripts share (``study_rela.py``, ``study_switch.py``): the same
flags parsed by the same rules (the trainer's ``rela_train.arg_types``), and the clean-tree rule
for their records.

A record says which code measured it: ``environment.git_sha`` with ``dirty`` (uncommitted
changes to tracked files) and ``diff_sha256`` (the hash of ``git diff HEAD``, naming the exact
changes). A full study refuses to run, and to write a record, from a dirty tree unless
``--allow-dirty`` is given; ``--quick`` runs (whose records stay under ``--out``) only mark them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rela_train.arg_types import non_empty, non_negative_int, positive_int

__all__ = ["dirty_refusal", "seed_list", "study_parser"]


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
