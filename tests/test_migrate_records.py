"""benchmarks/migrate_records.py: the committed records in the current format (the policy a run
really trained with, its study's name, the dirty flag instead of a ``-dirty`` sha), idempotent;
and the committed results hold no record in the old format."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


migrate = _load(ROOT / "benchmarks" / "migrate_records.py", "migrate_records_under_test")

FIT = "python -m rela_train fit --preset fashion-mnist-demo --threads 1 --seed 0 --recipe official"


def _study_record(run: str, flags: str, sha: str) -> dict:
    return {
        "study": "rela-fashion-mnist",
        "run": run,
        "command": f"{FIT} {flags} --out /somewhere/runs/{run}",
        "selection": None,
        "metrics": {"knn_acc": 0.8},
        "environment": {"git_sha": sha, "device": "cpu"},
    }


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_study_records_get_their_policy_study_and_dirty_flag(tmp_path: Path) -> None:
    records = [
        _study_record("byol", "--budget 1", "a" * 40),
        _study_record("hard", "--budget 0.5 --policy hard", "b" * 40 + "-dirty"),
        _study_record("old-flag", "--budget 0.5 --selection infobatch", "c" * 40),
    ]
    for name, study in (("switch-other-machine.jsonl", "rela-switch"),
                        ("study.jsonl", "rela-fashion-mnist")):  # fmt: skip
        path = tmp_path / name
        _write(path, records)
        assert migrate.migrate_path(path) == 3
        byol, hard, old = _read(path)
        assert [r["policy"] for r in (byol, hard, old)] == ["random", "hard", "infobatch"]
        assert all(r["study"] == study and "selection" not in r for r in (byol, hard, old))
        assert hard["environment"] == {
            "git_sha": "b" * 40, "dirty": True, "diff_sha256": None, "device": "cpu"
        }  # fmt: skip
        assert byol["environment"]["dirty"] is False and byol["environment"]["git_sha"] == "a" * 40
        before = path.read_bytes()
        assert migrate.migrate_path(path) == 0 and path.read_bytes() == before  # idempotent


def test_flat_benchmark_records_and_records_folders(tmp_path: Path) -> None:
    path = tmp_path / "loss.jsonl"
    _write(path, [{"git_sha": "d" * 40 + "-dirty", "ms": 1.0}, {"ms": 2.0}])
    assert migrate.migrate_path(path) == 1
    assert _read(path) == [
        {"git_sha": "d" * 40, "dirty": True, "diff_sha256": None, "ms": 1.0}, {"ms": 2.0}
    ]  # fmt: skip
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(_study_record("run", "", "e" * 40)))
    with pytest.raises(ValueError, match="which study"):
        migrate.migrate_path(folder)
    assert migrate.main(["--study", "rela-switch", str(folder)]) == 0
    migrated = json.loads((folder / "run.json").read_text())
    assert migrated["study"] == "rela-switch" and migrated["policy"] == "random"


def test_the_committed_records_are_in_the_current_format() -> None:
    """Fails after a study appended records in the old format: run the migration."""
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.jsonl")):
        study = migrate.study_of_file(path)
        for line in path.read_text().splitlines():
            record = json.loads(line)
            holder = record.get("environment") or record
            sha = holder.get("git_sha")
            assert not (isinstance(sha, str) and sha.endswith("-dirty")), (path.name, sha)
            if isinstance(sha, str) and sha != "unknown":
                assert isinstance(holder.get("dirty"), bool), path.name
            if "study" in record:
                assert record["study"] == study, (path.name, record["run"])
                assert record.get("policy") == migrate.run_policy(record["command"]), record["run"]
                assert "selection" not in record, record["run"]


def test_lines_without_changes_stay_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "gate.jsonl"
    text = '{"z": 1, "a": 2}\n{"b": 1, "git_sha": "' + "f" * 40 + '-dirty"}\n'
    path.write_text(text)
    assert migrate.migrate_path(path) == 1
    first, second = path.read_text().splitlines()
    assert first == '{"z": 1, "a": 2}'  # untouched, its key order kept
    assert json.loads(second) == {"b": 1, "git_sha": "f" * 40, "dirty": True, "diff_sha256": None}
    before = path.read_bytes()
    assert migrate.migrate_path(path) == 0 and path.read_bytes() == before
