"""benchmarks/bench_loader.py: both pipelines cut the same views, and its records say what they
measured (speed itself is never asserted here: it is in benchmarks/results/loader.jsonl)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from rela_train.data.augment import byol_views
from rela_train.data.views import CropPlan, decode_views

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_loader_under_test", ROOT / "benchmarks" / "bench_loader.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_standard_pipeline_cuts_the_same_views_as_ours(tmp_path: Path) -> None:
    bench = _load()
    paths = bench.make_images(tmp_path, bench.IMAGENET_SHAPES, 4, 90, seed=0)
    plan = CropPlan(byol_views(True), 64, seed=0, epoch=0)
    for index, path in enumerate(paths):
        standard = bench.standard_views(path, plan, index)
        ours = decode_views(path, plan, index, decoder="pil")
        assert standard.shape == ours.shape == (2, 3, 64, 64)
        assert standard.dtype == ours.dtype == torch.uint8
        # Same boxes and flips: the pixels differ only by draft-mode decoding and resampling.
        difference = (standard.float() - ours.float()).abs().mean().item()
        assert difference < 6.0, (path.name, difference)
        # A wrong box or flip would differ by far more (the images are textured).
        assert (standard.float() - ours.flip(-1).float()).abs().mean().item() > 2 * difference


def test_records_name_the_sets_variants_and_cores(tmp_path: Path) -> None:
    bench = _load()
    out = tmp_path / "loader.jsonl"
    argv = ["--images", "2", "--size", "32", "--repeat", "1", "--warmup", "0", "--out", str(out)]
    assert bench.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["set"] for r in records} == {"imagenet", "large"}
    assert {"standard", "ours-pil"} <= {r["variant"] for r in records}
    for r in records:
        assert r["images_per_s"] > 0 and r["cores_for_target"] >= 1
        assert r["target_images_per_s"] == 2000.0 and r["load_average_1min"] >= 0
        assert r["device"] and r["git_sha"] and r["timestamp"]
    large = [r for r in records if r["set"] == "large"]
    assert all(r["long_side_max"] == 1000 for r in large)
