"""Smoke runs of benchmarks/bench_train.py (CPU, tiny model): it runs, prints a figure per variant,
and appends one valid JSON line per measurement where it is told to."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_train.py"
COMMITTED = ROOT / "benchmarks" / "results" / "train.jsonl"
VARIANTS = ("byol", "rela", "rela-byol")
TINY = [
    "--device", "cpu", "--steps", "2", "--warmup", "1", "--compile", "off", "--threads", "1",
    "--arch", "resnet10", "--width", "4", "--image-size", "16", "--batch-size", "8",
]  # fmt: skip
ROW = re.compile(r"^(device|folder|loader)\s+(\S+)\s+(on|off)\s+.*?(\S+) img/s", re.MULTILINE)


def _run(*args: str) -> dict[tuple[str, str], float]:
    """Run the script; ``{(data, variant): images/s}`` from its table."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rates = {(data, variant): float(rate) for data, variant, _, rate in ROW.findall(done.stdout)}
    assert rates, done.stdout
    for key, rate in rates.items():
        assert math.isfinite(rate) and rate > 0, (key, rate, done.stdout)
    return rates


def _state(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_size, path.stat().st_mtime_ns) if path.exists() else None


def test_device_data_every_variant_no_save():
    before = _state(COMMITTED)
    rates = _run("--data", "device", "--no-save")
    assert {variant for data, variant in rates if data == "device"} == set(VARIANTS)
    assert _state(COMMITTED) == before  # --no-save writes nothing


def test_folder_data_appends_json_lines(tmp_path):
    results = tmp_path / "out" / "train.jsonl"
    args = ["--data", "folder", "--workers", "0", "--folder", str(tmp_path / "jpegs")]
    args += ["--size-range", "24", "48", "--results", str(results)]
    rates = _run(*args)
    assert {variant for data, variant in rates if data == "folder"} == set(VARIANTS)
    assert {variant for data, variant in rates if data == "loader"} == {"byol", "rela"}
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == len(rates)
    for record in records:
        assert record["benchmark"] == "train" and record["device_type"] == "cpu"
        assert math.isfinite(record["images_per_s"]) and record["images_per_s"] > 0
        printed = rates[(record["data"], record["variant"])]
        assert math.isclose(record["images_per_s"], printed, rel_tol=1e-3, abs_tol=0.06)
        assert "load_average_1min" in record and "torch" in record
    byol = next(r for r in records if r["data"] == "folder" and r["variant"] == "byol")
    assert byol["ratio_to_byol"] == 1.0 and byol["loader_images_per_s"] > 0
    # A second run reuses the generated folder and appends after the first run's lines.
    _run(*args, "--variants", "byol")
    assert len(results.read_text().splitlines()) == len(records) + 2
