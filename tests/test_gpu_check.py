"""`make gpu-check` on a machine without CUDA exits at once with a one-line reason; the summary it
writes reads real benchmark records (made here at tiny CPU sizes) and a JUnit file."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_exits_at_once_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu-check: needs a CUDA")
    assert not out.exists()  # nothing built, nothing written
    assert time.monotonic() - began < 30


def test_summary_reads_benchmark_records_and_junit(tmp_path: Path) -> None:
    gpu_check = _load(SCRIPT, "gpu_check_under_test")
    records = tmp_path / "bench.jsonl"
    bench = ROOT / "benchmarks"
    bench_select = _load(bench / "bench_select.py", "bench_select_under_test")
    bench_select.main(
        ["--device", "cpu", "--out", str(records), "--sizes", "3000", "--warmup", "0"]
        + ["--repeat", "1", "--score-shape", "64", "16", "8"]
    )
    bench_embed = _load(bench / "bench_embed.py", "bench_embed_under_test")
    bench_embed.main(
        ["--device", "cpu", "--out", str(records), "--prior", "random:resnet10"]
        + ["--input-size", "16", "--batch-size", "2", "--repeat", "1"]
    )
    bench_loss = _load(bench / "bench_loss.py", "bench_loss_under_test")
    with records.open("a") as handle:
        for record in bench_loss.bench(64, 16, 8, torch.float32, torch.device("cpu"), 1):
            handle.write(json.dumps(record) + "\n")
        bench_configs = _load(bench / "bench_fused_configs.py", "bench_configs_under_test")
        configs = bench_configs.bench(40, 24, 16, torch.float32, torch.device("cpu"), 1)
        for record in configs:
            handle.write(json.dumps(record) + "\n")
    written = [json.loads(line) for line in records.read_text().splitlines()]
    assert all(r["git_sha"] and r["device"] and r["torch"] for r in written)

    rows = gpu_check.bench_table(records)
    assert len(rows) == 2 + len(written)  # header, rule, one row per record
    assert sum("| select_topk |" in r for r in rows) == 3  # one per k/N
    assert sum("| score_and_select |" in r and "x read p" in r for r in rows) == 1
    assert sum("| embed |" in r for r in rows) == 1
    # Every config of each mode (the interpreter runs them all), one of them the pick.
    from rela_kernels.triton import cosine_loss as kernels

    assert len(configs) == len(bench_configs.MODES) * len(kernels.fused_configs())
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in configs)
    fused_rows = [r for r in rows if "| fused config |" in r]
    assert len(fused_rows) == len(configs) and all("x predicted" in r for r in fused_rows)
    assert sum("(autotuner's pick)" in r for r in fused_rows) == len(bench_configs.MODES)
    assert sum("| loss fwd+bwd |" in r for r in rows) == len(written) - 5 - len(configs)
    # CPU records have no CUDA-graph time; where a record has one, its row shows it.
    assert not any("[graph" in r for r in rows)
    loss = next(r for r in written if r.get("benchmark") == "transported_cosine_loss")
    assert loss["graph_forward_backward_ms"] is None
    with_graph = dict(loss, graph_forward_backward_ms=0.25, eager_graph_forward_backward_ms=1.5)
    records.write_text(json.dumps(with_graph) + "\n")
    (row,) = gpu_check.bench_table(records)[2:]
    assert "[graph 0.250]" in row and "[graph 1.500]" in row

    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite tests="7" failures="1" errors="0" skipped="2">'
        "</testsuite></testsuites>"
    )
    assert gpu_check.junit_counts(junit) == "7 tests, 1 failures, 0 errors, 2 skipped"
    assert gpu_check.junit_counts(tmp_path / "missing.xml") == "no JUnit file"
    log = tmp_path / "sanitizer.log"
    log.write_text("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    assert gpu_check.sanitizer_summary(log) == "========= ERROR SUMMARY: 0 errors"


def test_stage_budgets_fit_the_deadline() -> None:
    # The build runs only where no loadable extension was carried along; every other stage gets
    # its whole budget, and the run ends inside the 10 minutes a remote command is given.
    # The stages run only when named (the compiled training steps) fit a run of their own.
    gpu_check = _load(SCRIPT, "gpu_check_budget")
    budget = gpu_check.BUDGET
    default = sum(budget[stage] for stage in gpu_check.DEFAULT_STAGES if stage != "build")
    assert default <= gpu_check.DEADLINE_S <= 9 * 60
    assert sum(budget[stage] for stage in gpu_check.OPTIONAL_STAGES) <= gpu_check.DEADLINE_S
    assert set(gpu_check.DEFAULT_STAGES) | set(gpu_check.OPTIONAL_STAGES) == set(budget)
    assert len(gpu_check.FILES) <= 8


def test_stages_are_chosen_by_name(tmp_path: Path, capsys) -> None:
    gpu_check = _load(SCRIPT, "gpu_check_stages")
    assert gpu_check.stage_list("tests, bench-loss") == ("tests", "bench-loss")
    for bad in ("tests,bench-los", ""):
        with pytest.raises(SystemExit):
            gpu_check.main(["--stages", bad, "--out", str(tmp_path / "out")])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--stages" in error and f"got {bad!r}" in error
    runner = gpu_check.Runner(tmp_path, ("quick",))
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    assert runner.run("bench-loss", command, "a.log").status == "not selected"
    assert not marker.exists()


def test_an_extension_without_cuda_kernels_is_built(tmp_path: Path) -> None:
    gpu_check = _load(SCRIPT, "gpu_check_loadable")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    # This Python's rela_kernels._C holds CPU kernels only (or is not built): build it.
    if not torch.cuda.is_available():
        assert gpu_check.loadable_extension(sys.executable, env) is None
    # A Python whose extension reports a CUDA kernel for every op: named, sized and hashed.
    library = tmp_path / "_C.fake.so"
    library.write_bytes(b"not really a library")
    reports = {
        "all": {"file": str(library), "ops": ["transport", "select_topk"], "without_cuda": []},
        "one missing": {"file": str(library), "ops": ["transport"], "without_cuda": ["transport"]},
    }
    for case, report in reports.items():
        fake = tmp_path / f"python-{case.replace(' ', '-')}"
        fake.write_text(f"#!/bin/sh\necho noise\necho '{json.dumps(report)}'\n")
        fake.chmod(0o755)
        found = gpu_check.loadable_extension(str(fake), env)
        if case == "all":
            assert found is not None and found["file"] == library.name and found["bytes"] == 20
            assert found["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()
        else:
            assert found is None


def test_a_stage_past_its_limit_is_stopped_with_its_children(tmp_path: Path, monkeypatch) -> None:
    gpu_check = _load(SCRIPT, "gpu_check_runner")
    monkeypatch.setitem(gpu_check.BUDGET, "quick", 30)
    monkeypatch.setitem(gpu_check.BUDGET, "hang", 1)
    runner = gpu_check.Runner(tmp_path, ("quick", "hang"))
    assert runner.run("quick", [sys.executable, "-c", "print('hello')"], "a.log").status == "ok"
    marker = tmp_path / "child-survived"
    grandchild = f"import time; time.sleep(2); open({str(marker)!r}, 'w')"
    hang = tmp_path / "hang.py"
    hang.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
        "time.sleep(60)\n"
    )
    began = time.monotonic()
    stage = runner.run("hang", [sys.executable, str(hang)], "a.log")
    assert stage.status == "timeout (1 s)" and time.monotonic() - began < 10
    time.sleep(3)
    assert not marker.exists()  # the grandchild was ended with the stage
    log = (tmp_path / "a.log").read_text()
    assert "hello" in log and "===== hang: timeout (1 s)" in log


def test_graph_time_is_none_off_cuda(capsys) -> None:
    module = _load(ROOT / "benchmarks" / "common.py", "common_graph")
    calls = []
    assert module.graph_median_time(lambda: calls.append(1), "cpu") is None
    assert calls == [] and capsys.readouterr().out == ""  # nothing run, nothing said
