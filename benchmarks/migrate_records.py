"""Bring benchmark records to the current record format, in place.

    python benchmarks/migrate_records.py benchmarks/results/*.jsonl
    python benchmarks/migrate_records.py --study rela-switch OUT/records

Each argument is a JSONL file (one record per line, rewritten atomically) or a study's
``records/`` directory (one record per ``*.json`` file, each rewritten atomically). What changes:

* **The code a record came from.** ``git_sha`` (in the record's ``environment``, or at its top
  level for the benchmarks that flatten it) is the commit alone, and ``dirty`` says whether the
  tree had uncommitted changes, with ``diff_sha256`` the hash of those changes. A sha that ended
  in ``-dirty`` becomes the bare sha with ``"dirty": true`` and ``"diff_sha256": null`` (the
  changes were not recorded, so they cannot be named); any other sha gets ``"dirty": false``
  (the suffix was added whenever tracked files differed).
* **A study record's policy** (records with ``study`` and ``command``): ``policy`` is the subset
  policy the run trained with, derived from the record's own ``command`` by the trainer's own
  parser (preset, flags and the ``--selection`` alias: exactly what ``fit`` ran); the old
  ``selection`` key, which held null, goes.
* **A study record's study**: the study that wrote the file, from its name: ``study*.jsonl`` is
  the ReLA study's (``rela-fashion-mnist``), ``switch*.jsonl`` the switch study's
  (``rela-switch``); a ``records/`` directory names its study with ``--study``.

A record already in the current format comes back unchanged, so running the migration twice
changes nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rela_study.grid import STUDY_NAME as RELA_STUDY  # noqa: E402
from rela_study.switch_grid import STUDY_NAME as SWITCH_STUDY  # noqa: E402

from rela_kernels.atomic_io import atomic_write_text  # noqa: E402

__all__ = ["migrate_path", "migrate_record", "run_policy", "study_of_file"]

DIRTY_SUFFIX = "-dirty"
# File name prefix -> the study whose results file it is.
STUDY_FILES = {"study": RELA_STUDY, "switch": SWITCH_STUDY}


def run_policy(command: str) -> str:
    """The subset policy of the ``fit`` run that ``command`` started (preset and flags applied
    by the trainer's own parser)."""
    from rela_train.cli import build_parser
    from rela_train.config import config_from_args
    from rela_train.presets import get_preset

    argv = shlex.split(command)
    if "fit" not in argv:
        raise ValueError(f"not a `rela_train fit` command: {command!r}")
    args = build_parser().parse_args(argv[argv.index("fit") :])
    return config_from_args(get_preset(args.preset), args).policy


def study_of_file(path: Path) -> str | None:
    """The study whose results file ``path`` is (by its name), or None."""
    for prefix, study in STUDY_FILES.items():
        if path.name.startswith(prefix):
            return study
    return None


def _mark_code(holder: dict[str, Any]) -> None:
    sha = holder.get("git_sha")
    if not isinstance(sha, str) or sha == "unknown" or "dirty" in holder:
        return
    dirty = sha.endswith(DIRTY_SUFFIX)
    holder["git_sha"] = sha.removesuffix(DIRTY_SUFFIX)
    holder["dirty"] = dirty
    holder["diff_sha256"] = None


def migrate_record(record: dict[str, Any], study: str | None) -> dict[str, Any]:
    """``record`` in the current format (module doc); ``study`` names the study of a study
    record (required for those)."""
    record = json.loads(json.dumps(record))  # a copy
    environment = record.get("environment")
    _mark_code(environment if isinstance(environment, dict) else record)
    if "study" in record and "command" in record:
        if study is None:
            raise ValueError(f"record {record.get('run')!r}: which study wrote it? (--study)")
        record["study"] = study
        record.pop("selection", None)
        record["policy"] = run_policy(record["command"])
    return record


def _rewrite_jsonl(path: Path, migrate: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Rewrite the lines whose record changes (keys sorted where the line had them sorted);
    every other line, and a file without changes, stays byte for byte."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out, changed = [], 0
    for line in lines:
        record = json.loads(line)
        migrated = migrate(record)
        if migrated == record:
            out.append(line)
            continue
        changed += 1
        out.append(json.dumps(migrated, sort_keys=json.dumps(record, sort_keys=True) == line))
    if changed:
        atomic_write_text(path, "".join(line + "\n" for line in out))
    return changed


def migrate_path(path: Path, study: str | None = None) -> int:
    """Migrate the JSONL file or records directory ``path`` in place; returns how many records
    changed. ``study``: the study of its study records (default: from a file's name)."""
    study = study or study_of_file(path)

    def migrate(record: dict[str, Any]) -> dict[str, Any]:
        return migrate_record(record, study)

    if path.is_dir():
        changed = 0
        for file in sorted(path.glob("*.json")):
            record = json.loads(file.read_text(encoding="utf-8"))
            migrated = migrate(record)
            if migrated != record:
                atomic_write_text(file, json.dumps(migrated, sort_keys=True, indent=1) + "\n")
                changed += 1
        return changed
    return _rewrite_jsonl(path, migrate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="JSONL files or records/ folders")
    parser.add_argument(
        "--study", choices=sorted(STUDY_FILES.values()), help="the study of a records/ folder"
    )
    args = parser.parse_args(argv)
    for path in args.paths:
        if not path.exists():
            parser.error(f"{path}: no such file or directory")
    for path in args.paths:
        print(f"{path}: {migrate_path(path, args.study)} record(s) changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
