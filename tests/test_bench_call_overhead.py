"""benchmarks/bench_call_overhead.py: one record per op and call, the host time being the call
less its bare kernel."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import rela_kernels as rk

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not rk.backends.available()["cpu"].usable, reason="needs the C++ extension")
def test_records_split_each_call_into_kernel_and_host(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_call_overhead_under_test", ROOT / "benchmarks" / "bench_call_overhead.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "overhead.jsonl"
    assert module.main(["--out", str(out), "--calls", "3", "--rounds", "3"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    calls = {(r["op"], r["call"]) for r in records}
    assert calls == {
        ("transported_cosine_loss", "forward"),
        ("transported_cosine_loss", "forward_backward"),
        ("cosine_loss", "forward"),
        ("cosine_loss", "forward_backward"),
        ("select_topk", "forward"),
        ("score_and_select", "forward"),
    }
    for r in records:
        assert r["us_per_call"] > 0 and r["kernel_us"] > 0 and "git_sha" in r
        if r["call"] == "forward":
            assert r["host_us"] == pytest.approx(r["us_per_call"] - r["kernel_us"], abs=0.02)
        else:
            assert r["host_us"] is None and r["eager_us"] > 0
