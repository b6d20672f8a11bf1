"""The compile gate (benchmarks/compile_gate.py): Triton kernels compiled for sm_80 and sm_90 on a
machine without a GPU, and the pruning that reads what ptxas reported.

The quick subset compiles here, in two subprocesses run side by side (the kernel module must be
imported without TRITON_INTERPRET there): the pinned Triton, and Triton 3.6.0 from its side
directory (`make install` provisions it; skipped with the reason where absent). `make
gpu-compile` runs the whole matrix. The rest checks, without compiling, the parts the gate's
verdict rests on: the ptxas report parser, the failure rules, the traffic model, and that the
checked-in resource table covers every fused variant of the matrix and drives the pruning.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from rela_kernels.triton import cosine_loss as kernels  # noqa: E402
from rela_kernels.triton import resource_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GATE_PATH = ROOT / "benchmarks" / "compile_gate.py"
SUBSET_TIMEOUT_S = 300


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gate = _load(GATE_PATH, "compile_gate_under_test")
traffic_model = _load(ROOT / "benchmarks" / "traffic_model.py", "traffic_model_under_test")


def _triton_side_dir() -> Path:
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "triton-side-path"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return Path(out.strip().split("=", 1)[1])


def _side_reason(side: Path) -> str | None:
    """None when Triton 3.6.0 imports from ``side`` with this Python, else why not."""
    if not (side / "triton" / "__init__.py").is_file():
        return f"no Triton in {side}: `make install` (or `make triton-side`) installs it"
    probe = (
        f"import sys; sys.path.insert(0, {str(side)!r}); import triton; print(triton.__version__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        return f"Triton in {side} does not import: {done.stderr.strip().splitlines()[-1:]}"
    return None


def _start(tmp: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    out, summary = tmp / f"{name}.jsonl", tmp / f"{name}-summary.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(GATE_PATH), "--subset", "--out", str(out)]
    command += ["--summary", str(summary), *extra]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, out, summary


@pytest.fixture(scope="module")
def subset_runs(tmp_path_factory) -> dict[str, tuple | str]:
    """The pinned Triton's subset on both targets, Triton 3.6.0's on sm_80 (where the two
    versions' ptxas input differs most), side by side; a skip reason instead of a run."""
    tmp = tmp_path_factory.mktemp("compile_gate")
    runs = {"pinned": _start(tmp, "pinned", "--targets", "80", "90")}
    side = _triton_side_dir()
    reason = _side_reason(side)
    runs["3.6"] = reason or _start(tmp, "side", "--targets", "80", "--triton-path", str(side))
    results = {}
    for name, run in runs.items():
        if isinstance(run, str):
            results[name] = run
            continue
        proc, out, summary = run
        output, _ = proc.communicate(timeout=SUBSET_TIMEOUT_S)
        results[name] = (proc.returncode, output.decode(errors="replace"), out, summary)
    return results


def _checked_run(subset_runs, name: str) -> tuple[list[dict], dict]:
    run = subset_runs[name]
    if isinstance(run, str):
        pytest.skip(run)
    rc, output, out, summary = run
    assert rc == 0, f"the compile gate failed ({name}):\n{output[-6000:]}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return records, json.loads(summary.read_text())


def _assert_gate_passed(records: list[dict], summary: dict, targets: set[str]) -> None:
    assert records and {r["target"] for r in records} == targets
    assert summary["errors"] == 0 and summary["problems"] == []
    assert all(r["error"] is None for r in records)
    candidates = [r for r in records if r["candidate"]]
    assert candidates and all(r["spill_bytes"] == 0 for r in candidates)
    for r in records:
        assert 0 < r["registers"] <= 255 and r["shared"] > 0
        assert (
            r["shared"] <= resource_table.SHARED_LIMIT[int(r["target"][3:])] or not r["candidate"]
        )
        # 16-bit GEMMs on the tensor cores: mma.sync on sm_80; wgmma or mma.sync on sm_90.
        if r["op"] == "fused" and r["p_dtype"] != "float32":
            assert r["mma"] + r["wgmma"] > 0
            assert r["wgmma"] == 0 or r["target"] == "sm_90"


def test_subset_compiles_without_spills_under_the_pinned_triton(subset_runs):
    records, summary = _checked_run(subset_runs, "pinned")
    _assert_gate_passed(records, summary, {"sm_80", "sm_90"})
    assert summary["triton"] == __import__("triton").__version__
    # The Hopper shape: a candidate with 64+ rows per program, wgmma and no spill, for the loss
    # with gradient and for the histogram; its predicted L2 traffic within 3x the HBM floor.
    for mode in ("grad", "hist-largest"):
        best = summary["hopper"][mode]
        assert best is not None, f"no Hopper-shaped candidate for {mode}"
        assert best["BLOCK_B"] >= 64 and best["wgmma"] > 0 and best["spill_bytes"] == 0
        assert best["l2_over_hbm"] <= 3.0
    # Every record of the fused kernel carries the traffic model's prediction.
    fused = [r for r in records if r["op"] == "fused"]
    assert fused and all(r["traffic"]["predicted_ms"] > 0 for r in fused)


def test_subset_compiles_without_spills_under_triton_3_6(subset_runs):
    records, summary = _checked_run(subset_runs, "3.6")
    assert summary["triton"] == "3.6.0"
    _assert_gate_passed(records, summary, {"sm_80"})


# ------------------------------------------------------------------------------------------
# The gate's parts, no compiling
# ------------------------------------------------------------------------------------------

REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kernel_a' for 'sm_80'
ptxas info    : Function properties for kernel_a
    8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 384 bytes cmem[0]
ptxas info    : Compiling entry function 'kernel_b' for 'sm_90a'
ptxas info    : Function properties for kernel_b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, 16640 bytes smem, 400 bytes cmem[0]
"""


def test_ptxas_report_parser():
    a, b = gate.parse_ptxas_report(REPORT)
    assert (a["kernel"], a["arch"], a["registers"]) == ("kernel_a", "sm_80", 96)
    assert (a["stack_frame"], a["spill_stores"], a["spill_loads"], a["spill_bytes"]) == (
        8,
        12,
        20,
        32,
    )
    assert (b["arch"], b["registers"], b["spill_bytes"]) == ("sm_90a", 255, 0)
    with pytest.raises(ValueError, match="one kernel"):
        gate.ptxas_resources(REPORT)
    assert (
        gate.ptxas_resources(
            REPORT.split("ptxas info    : Compiling entry function 'kernel_b'")[0]
        )["spill_bytes"]
        == 32
    )
    counts = gate.instruction_counts(
        "mma.sync.aligned.m16n8k16 x; wgmma.mma_async.sync y; wgmma.mma_async z"
    )
    assert counts == {"mma": 1, "wgmma": 2}


def _record(**changes) -> dict:
    base = {
        "case": "c", "op": "fused", "target": "sm_90", "triton": "3.9.0", "mode": "grad",
        "p_dtype": "bfloat16", "z_dtype": "bfloat16", "B": gate.BENCH_B, "d": gate.BENCH_D,
        "Dp": gate.BENCH_DP, "BLOCK_B": 64, "BLOCK_D": 256, "BLOCK_K": 32, "num_warps": 8,
        "num_stages": 3, "candidate": True, "error": None, "spill_bytes": 0, "shared": 1000,
        "wgmma": 2, "traffic": {"l2_bytes": 1.0},
    }  # fmt: skip
    return {**base, **changes}


def test_failure_rules():
    assert gate.problems([_record(), _record(candidate=False, spill_bytes=64)]) == []
    assert "spills 64 bytes" in gate.problems([_record(spill_bytes=64)])[0]
    assert "compile error" in gate.problems([_record(error="CompilationError: x")])[0]
    assert "shared memory" in gate.problems([_record(target="sm_80", shared=200_000)])[0]
    # The Hopper shape needs a spill-free wgmma candidate of 64+ rows.
    assert gate.hopper_shape([_record()])["grad"] is not None
    for bad in ({"BLOCK_B": 32}, {"wgmma": 0}, {"spill_bytes": 4}, {"candidate": False}):
        assert gate.hopper_shape([_record(**bad)]) == {"grad": None}, bad


def test_traffic_model_counts_bytes_and_rereads():
    model = traffic_model.fused_loss_traffic
    shape = dict(batch=65536, dp=768, d=256, p_bytes=2, z_bytes=2, dot="lowp", block_d=256)
    small = model(**shape, block_b=16, single_tile=True, grad=True)
    large = model(**shape, block_b=64, single_tile=True, grad=True)
    matrix = 768 * 256 * 2
    floor = 65536 * (768 * 2 + 256 * 2 + 4 + 256 * 2) + matrix  # p, z, loss, gradient, matrix
    assert small.hbm_bytes == large.hbm_bytes == floor
    assert small.l2_bytes == (4096 - 1) * matrix and large.l2_bytes == (1024 - 1) * matrix
    assert 9.5 < small.l2_over_hbm < 9.7  # about 9.6x: 4095 matrix reads at BLOCK_B = 16
    assert large.l2_over_hbm <= 3.0 and large.predicted_ms < small.predicted_ms
    assert small.flops == 2 * 65536 * 768 * 256 + 8 * 65536 * 256
    # The d-tiled path with gradient: two passes, p read again per column tile and pass.
    tiled = model(**{**shape, "d": 512, "block_d": 128}, block_b=16, single_tile=False, grad=True)
    assert tiled.passes == 2 and tiled.l2_bytes > 7 * 65536 * 768 * 2
    # float32 p without TF32 is bound by the FMA units, far above its memory floor.
    fp32 = model(**{**shape, "p_bytes": 4, "dot": "ieee"}, block_b=64, single_tile=True, grad=True)
    assert fp32.bound == "compute"
    assert fp32.predicted_ms > 4 * fp32.hbm_bytes / traffic_model.H200.hbm_bytes_per_s * 1e3


def test_resource_table_lookup_rules():
    assert (
        resource_table.version_key("3.9.0") == "3.9"
        and resource_table.version_key("3.6.0+git") == "3.6"
    )
    # Narrow single tiles are judged by the 256-column measurement.
    key = resource_table.variant_key(single=True, block_d=64, dot="lowp", grad=True, hist=False)
    assert key == "single-d256-lowp-grad"
    assert resource_table.variant_key(
        single=False, block_d=64, dot="ieee", grad=False, hist=True
    ) == ("tiled-d64-ieee-hist")
    assert resource_table.fits(90, {"spill_bytes": 0, "shared": 200_000})
    assert not resource_table.fits(80, {"spill_bytes": 0, "shared": 200_000})
    assert not resource_table.fits(90, {"spill_bytes": 8, "shared": 1000})
    # Targets never measured (Blackwell, Volta) fall back to the rule: no table verdict.
    assert resource_table.lookup(100, "3.9.0", key) is None
    assert resource_table.lookup(70, "3.9.0", key) is None


def _table() -> dict:
    return json.loads(resource_table.TABLE_PATH.read_text())["resources"]


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _fused_launch(case, arch: int):
    z_dtype, p_dtype = getattr(torch, case.z_dtype), getattr(torch, case.p_dtype)
    z = _meta(case.batch, case.d, dtype=z_dtype)
    hist = None
    if case.mode.startswith("hist"):
        hist = (_meta(2**16, dtype=torch.int32), case.mode == "hist-largest", kernels.HIST_BITS)
    return kernels.fused_loss_launch(
        z, _meta(case.batch, case.dp, dtype=p_dtype), _meta(case.dp), _meta(case.dp, case.d),
        _meta(case.d) if case.bias else None, 1e-8, case.mode == "grad", hist,
        _meta(case.batch), torch.empty_like(z), arch,
    )  # fmt: skip


def test_table_covers_every_fused_variant_of_the_matrix():
    """Stale after a kernel or config change: rerun `make gpu-compile-calibrate`."""
    table = _table()
    assert {"3.6", resource_table.version_key(__import__("triton").__version__)} <= set(table)
    every = {resource_table.config_key(c) for c in kernels.fused_configs()}
    for version, targets in table.items():
        assert set(targets) == {"80", "90"}, version
        for case in (c for c in gate.CASES if c.op == "fused"):
            for arch in (80, 90):
                meta = _fused_launch(case, arch).meta
                variant = resource_table.variant_key(
                    single=meta["SINGLE_TILE"],
                    block_d=meta["BLOCK_D"],
                    dot=resource_table.dot_kind(meta["LOWP_DOT"], meta["INPUT_PRECISION"]),
                    grad=meta["COMPUTE_GRAD"],
                    hist=meta["HIST"],
                )
                assert set(targets[str(arch)][variant]) == every, (version, arch, variant)
        every_transport = {resource_table.config_key(c) for c in kernels.transport_configs()}
        for arch in ("80", "90"):
            for dot in ("lowp", "ieee"):
                variant = resource_table.transport_variant_key(dot)
                assert set(targets[arch][variant]) == every_transport, (version, arch, variant)


@pytest.mark.parametrize("version", ["3.6.0", "3.9.0"])
@pytest.mark.parametrize("arch", [80, 90])
def test_pruning_keeps_only_what_the_table_says_fits(arch, version, monkeypatch):
    """The autotuner's candidates (its own pruning, run here on meta tensors) are the configs
    the measurements call spill-free, for every fused case of the matrix."""
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    measured = _table()[resource_table.version_key(version)][str(arch)]
    for case in (c for c in gate.CASES if c.op == "fused" and c.batch >= 1000):
        launch = _fused_launch(case, arch)
        meta = launch.meta
        variant = resource_table.variant_key(
            single=meta["SINGLE_TILE"],
            block_d=meta["BLOCK_D"],
            dot=resource_table.dot_kind(meta["LOWP_DOT"], meta["INPUT_PRECISION"]),
            grad=meta["COMPUTE_GRAD"],
            hist=meta["HIST"],
        )
        kept = {resource_table.config_key(c) for c in launch.candidates()}
        fitting = {k for k, res in measured[variant].items() if resource_table.fits(arch, res)}
        assert kept == fitting or (not fitting and len(kept) == 1), (case.name, kept, fitting)
    # The transport kernel too.
    for dtype, dot in ((torch.bfloat16, "lowp"), (torch.float32, "ieee")):
        p = _meta(gate.BENCH_B, gate.BENCH_DP, dtype=dtype)
        launch = kernels.transport_launch(
            p, _meta(gate.BENCH_DP), _meta(gate.BENCH_DP, gate.BENCH_D), None,
            _meta(gate.BENCH_B, gate.BENCH_D), arch,
        )  # fmt: skip
        kept = {resource_table.config_key(c) for c in launch.candidates()}
        entries = measured[resource_table.transport_variant_key(dot)]
        assert kept == {k for k, res in entries.items() if resource_table.fits(arch, res)}
    # The Hopper shape keeps a 64-row tile on sm_90 (bf16, with gradient).
    hopper = next(c for c in gate.CASES if c.subset == (90,) and c.mode == "grad")
    blocks = {c.kwargs["BLOCK_B"] for c in _fused_launch(hopper, arch).candidates()}
    assert arch != 90 or max(blocks) >= 64
