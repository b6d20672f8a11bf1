"""One JSON record per finished run, written atomically; the study's JSONL is rebuilt from them.

Each run's record is its own file (``OUT/records/RUN_ID.json``), written to a temporary sibling
and renamed, so a killed study leaves either a whole record or none: a resumed study skips the
runs whose record exists. The JSONL in ``benchmarks/results/`` is rewritten (atomically, one
writer: the study's parent process) from all records after each run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rela_kernels.atomic_io import atomic_write_text

__all__ = ["done_runs", "load_records", "record_path", "write_jsonl", "write_record"]


def record_path(out: Path, run_id: str) -> Path:
    return out / "records" / f"{run_id}.json"


def write_record(out: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (it must hold ``run``) as ``OUT/records/RUN.json``, atomically."""
    if not isinstance(record.get("run"), str) or not record["run"]:
        raise ValueError(f"record: expected a non-empty 'run' id, got {record.get('run')!r}")
    path = record_path(out, record["run"])
    atomic_write_text(path, json.dumps(record, sort_keys=True, indent=1) + "\n")
    return path


def load_records(out: Path) -> list[dict[str, Any]]:
    """Every record under ``OUT/records``, sorted by run id."""
    folder = out / "records"
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as error:
            raise ValueError(f"record {path} is not valid JSON ({error})") from error
    return records


def done_runs(out: Path) -> set[str]:
    """Ids of the runs whose record exists (a resumed study skips them)."""
    return {record["run"] for record in load_records(out)}


def write_jsonl(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> Path:
    """All records as one JSON line each, replacing ``path`` atomically."""
    path = Path(path)
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
    atomic_write_text(path, text)
    return path
