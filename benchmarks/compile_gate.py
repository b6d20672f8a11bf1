"""The compile gate: every Triton kernel configuration the launchers can launch, compiled ahead of
time for sm_80 and sm_90 on a machine without a GPU, with what ptxas reports about each.

For every case of the matrix (``CASES``: op, shape, dtypes, gradient, histogram, bias) and every
target, the gate asks the launcher for its launch (``rela_kernels.triton.cosine_loss``'s
``*_launch`` functions: the same arguments, constexprs, autotuning list and pruning as a real
launch, on meta tensors) and compiles each candidate configuration through Triton's own JIT
specialisation, ``JITFunction.warmup``, which builds the ``ASTSource`` and calls
``triton.compiler.compile(..., target=GPUTarget("cuda", arch, 32))``. A stand-in driver names the
target, as no GPU is there to ask. ptxas's ``-v`` report (captured from Triton's own ptxas run)
gives registers and spill bytes; the compiled kernel's metadata gives shared memory; its PTX
gives the ``mma.sync`` and ``wgmma`` counts. One JSON record per compiled configuration.

It fails (exit status 1) on a compile error, on a spill or too much shared memory in any
configuration the autotuner can pick, and when the benchmark shape on sm_90 (bf16) has no
candidate with BLOCK_B >= 64, wgmma and no spill for the loss, the loss with gradient and the
histogram. ``--calibrate`` compiles every configuration of the fused kernel's list (not only the
candidates) and rewrites ``rela_kernels/triton/measured_resources.json``, which the pruning reads.
``--from-records FILE`` judges (and with ``--calibrate`` tabulates) the records of an earlier run
under the same Triton instead of compiling again. ``--nvcc-out FILE`` also compiles the
torch-free CUDA sources with ``nvcc -cubin -Xptxas -v`` per target and fails on a spill.

Run it in a fresh process without ``TRITON_INTERPRET`` (the kernels must be JIT functions);
``--triton-path DIR`` puts another Triton (e.g. 3.6.0 installed with ``pip install --target``)
first on ``sys.path``. See docs/gpu-compile.md.

    python benchmarks/compile_gate.py --out benchmarks/results/compile_gate-triton3.9.jsonl
    python benchmarks/compile_gate.py --subset --targets 90
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (80, 90)
# The benchmark shape of the goals (docs/gpu-compile.md).
BENCH_B, BENCH_DP, BENCH_D = 65536, 768, 256


@dataclass(frozen=True)
class Case:
    """One launch of one op: ``mode`` is loss, grad, hist-largest or hist-smallest."""

    op: str  # fused, cosine_loss, transport
    batch: int
    d: int
    dp: int
    p_dtype: str  # the prior's dtype (fused, transport); y's for cosine_loss
    z_dtype: str
    mode: str
    bias: bool
    subset: tuple[int, ...] = ()  # the targets on which it is part of `make test`'s subset

    @property
    def name(self) -> str:
        shape = f"B{self.batch}-d{self.d}-Dp{self.dp}"
        bias = "-bias" if self.bias else ""
        return f"{self.op}-{shape}-p{self.p_dtype}-z{self.z_dtype}-{self.mode}{bias}"


# The quick subset (`--subset`, tests/test_compile_gate.py), by (dtype, d, mode): the Hopper
# shape with gradient and histogram on sm_90, and the float32 d-tiled loop on sm_80, the cases
# where a per-thread register rule alone lets spilling configurations through.
SUBSET = {
    ("bfloat16", BENCH_D, "grad"): (90,),
    ("bfloat16", BENCH_D, "hist-largest"): (90,),
    ("float32", 512, "loss"): (80,),
}


def _fused_cases() -> list[Case]:
    cases = []
    for dtype in ("bfloat16", "float16", "float32"):
        for d in (BENCH_D, 512):  # one register tile, and the d-tiled two-pass path
            for mode, bias in (("loss", False), ("grad", True), ("hist-largest", False)):
                subset = SUBSET.get((dtype, d, mode), ())
                cases.append(Case("fused", BENCH_B, d, BENCH_DP, dtype, dtype, mode, bias, subset))
    cases += [
        Case("fused", BENCH_B, BENCH_D, BENCH_DP, "bfloat16", "bfloat16", "hist-smallest", True),
        # B not divisible by 16 (no divisibility specialisation of B), and mixed dtypes.
        Case("fused", BENCH_B - 1, BENCH_D, BENCH_DP, "bfloat16", "bfloat16", "grad", False),
        Case("fused", 1000 - 1, 512, BENCH_DP, "float32", "float32", "loss", True),
        Case("fused", BENCH_B, BENCH_D, BENCH_DP, "bfloat16", "float32", "grad", False),
        Case("fused", BENCH_B, BENCH_D, BENCH_DP, "float32", "bfloat16", "grad", True),
        # A small batch: the B bucket prunes the larger tiles.
        Case("fused", 40, 64, 96, "float16", "float16", "grad", False),
    ]
    return cases


def _other_cases() -> list[Case]:
    cases = []
    for n, dtype in enumerate(("bfloat16", "float16", "float32")):
        for d in (BENCH_D, 2000):  # one tile, and tiles of 1024 columns
            mode = "grad" if n % 2 == 0 else "loss"
            subset = (80,) if dtype == "float32" and d == BENCH_D else ()
            cases.append(Case("cosine_loss", BENCH_B - 1, d, 0, dtype, dtype, mode, False, subset))
        cases.append(Case("transport", BENCH_B, BENCH_D, BENCH_DP, dtype, dtype, "-", n != 1))
    return cases


CASES = _fused_cases() + _other_cases()


class TargetDriver:
    """The stand-in for Triton's CUDA driver: it names the target and nothing else (compiling
    needs no device; launching would)."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> str:
        return f"compile-gate-sm_{self.arch}"  # one JIT cache per target

    def get_current_stream(self, device=None) -> int:
        return 0


def target_arch(target: str) -> int:
    """``sm_90`` -> ``90``: the compute capability a record's target names."""
    return int(target.removeprefix("sm_"))


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_report(log: str) -> list[dict]:
    """One dict per kernel of a ``ptxas -v`` report (nvcc's or Triton's): the kernel, its
    target, registers, stack frame and spill bytes (stores plus loads)."""
    parts = _ENTRY.split(log)  # text before, then (name, target, text after) per kernel
    found = []
    for name, arch, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        registers, spills = _REGISTERS.search(body), _SPILLS.search(body)
        if registers is None or spills is None:
            raise ValueError(f"no register or spill line for {name} in the ptxas report")
        stack, stores, loads = (int(x) for x in spills.groups())
        found.append(
            {
                "kernel": name,
                "arch": arch,
                "registers": int(registers.group(1)),
                "stack_frame": stack,
                "spill_stores": stores,
                "spill_loads": loads,
                "spill_bytes": stores + loads,
            }
        )
    return found


def ptxas_resources(log: str) -> dict:
    """Registers, spill and stack bytes from Triton's ``ptxas -v`` report of one kernel."""
    kernels = parse_ptxas_report(log)
    if len(kernels) != 1:
        raise ValueError(f"expected one kernel in the ptxas report, got:\n{log[-2000:]}")
    return {k: v for k, v in kernels[0].items() if k not in ("kernel", "arch")}


# As setup.py's CUDAExtension builds them (no implicit half/bfloat16 conversions).
NVCC_FLAGS = (
    "-std=c++17",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)


def cuda_sources() -> list[Path]:
    """The torch-free CUDA sources (bindings.cu needs CUDA torch's headers)."""
    return sorted(p for p in (ROOT / "csrc" / "cuda").glob("*.cu") if p.name != "bindings.cu")


def nvcc_records(nvcc: str, targets: list[int], workdir: Path) -> list[dict]:
    """``nvcc -cubin -Xptxas -v -arch=sm_XX`` of every torch-free source: one record per kernel
    and target (an ``error`` record where nvcc fails)."""
    records = []
    for source in cuda_sources():
        for arch in targets:
            cubin = workdir / f"{source.stem}-sm_{arch}.cubin"
            command = [nvcc, "-cubin", "-Xptxas", "-v", f"-arch=sm_{arch}", *NVCC_FLAGS]
            done = subprocess.run(
                [*command, str(source), "-o", str(cubin)], capture_output=True, text=True
            )
            where = {"source": source.name, "target": f"sm_{arch}", "nvcc": nvcc}
            if done.returncode != 0:
                records.append({**where, "error": (done.stdout + done.stderr)[-1500:]})
                continue
            for kernel in parse_ptxas_report(done.stdout + done.stderr):
                records.append({**where, **kernel, "error": None})
    return records


def instruction_counts(ptx: str) -> dict:
    return {"mma": len(re.findall(r"\bmma\.sync\.", ptx)), "wgmma": ptx.count("wgmma.mma_async")}


def _tensors(case: Case):
    import torch

    dt = {name: getattr(torch, name) for name in ("bfloat16", "float16", "float32")}
    meta = torch.device("meta")  # shapes, dtypes and (aligned) addresses, no memory

    def empty(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=meta)

    z = empty(case.batch, case.d, dtype=dt[case.z_dtype])
    return {
        "z": z,
        "p": empty(case.batch, case.dp, dtype=dt[case.p_dtype]),
        "y": empty(case.batch, case.d, dtype=dt[case.p_dtype]),
        "mean": empty(case.dp),
        "matrix": empty(case.dp, case.d),
        "bias": empty(case.d) if case.bias else None,
        "loss": empty(case.batch),
        "grad": empty(case.batch, case.d, dtype=dt[case.z_dtype]),
        "hist": empty(2**16, dtype=torch.int32),
        "out": empty(case.batch, case.d),
    }


def launch_of(case: Case, arch: int):
    """The launcher's own launch of ``case`` on ``arch`` (the kernel module's public helpers)."""
    from rela_kernels.triton import cosine_loss as kernels

    t = _tensors(case)
    grad = case.mode == "grad"
    if case.op == "transport":
        return kernels.transport_launch(t["p"], t["mean"], t["matrix"], t["bias"], t["out"], arch)
    if case.op == "cosine_loss":
        return kernels.cosine_loss_launch(t["z"], t["y"], 1e-8, grad, t["loss"], t["grad"], arch)
    histogram = None
    if case.mode.startswith("hist"):
        histogram = (t["hist"], case.mode == "hist-largest", kernels.HIST_BITS)
    return kernels.fused_loss_launch(
        t["z"], t["p"], t["mean"], t["matrix"], t["bias"], 1e-8, grad, histogram,
        t["loss"], t["grad"], arch,
    )  # fmt: skip


def _traffic(case: Case, launch, config) -> dict:
    from benchmarks.traffic_model import fused_loss_traffic
    from rela_kernels.triton import resource_table

    meta = launch.meta
    size = {"bfloat16": 2, "float16": 2, "float32": 4}
    return fused_loss_traffic(
        batch=case.batch,
        dp=case.dp,
        d=case.d,
        p_bytes=size[case.p_dtype],
        z_bytes=size[case.z_dtype],
        dot=resource_table.dot_kind(meta["LOWP_DOT"], meta["INPUT_PRECISION"]),
        block_b=config.kwargs["BLOCK_B"],
        block_d=meta["BLOCK_D"],
        single_tile=meta["SINGLE_TILE"],
        grad=meta["COMPUTE_GRAD"],
    ).as_dict()


def compile_config(launch, config) -> dict:
    """Compile one configuration of ``launch`` for the active target; ptxas's report included."""
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas's -v report after each compile
    captured = io.StringIO()
    began = time.monotonic()
    with contextlib.redirect_stdout(captured):
        compiled = launch.kernel.warmup(
            *launch.args, grid=(1,), **launch.meta, **config.all_kwargs()
        )
    seconds = time.monotonic() - began
    return {
        **ptxas_resources(captured.getvalue()),
        **instruction_counts(compiled.asm["ptx"]),
        "shared": int(compiled.metadata.shared),
        "compile_s": round(seconds, 2),
    }


def _blocks(launch, config) -> dict:
    keys = ("BLOCK_B", "BLOCK_D", "BLOCK_K")
    merged = {**launch.meta, **config.kwargs}
    return {k: merged[k] for k in keys if k in merged}


def run_case(case: Case, arch: int, every_config: bool) -> list[dict]:
    """Records of every candidate configuration of ``case`` on ``arch`` (with ``every_config``,
    of the fused kernel's whole list, candidates flagged)."""
    import triton

    from rela_kernels.triton import cosine_loss as kernels
    from rela_kernels.triton import resource_table

    triton.runtime.driver.set_active(TargetDriver(arch))
    launch = launch_of(case, arch)
    candidates = launch.candidates()
    configs = candidates
    if every_config and case.op == "fused":
        configs = kernels.fused_configs()
    elif every_config and case.op == "transport":
        configs = kernels.transport_configs()
    candidate_keys = {str(c) for c in candidates}
    records = []
    for config in configs:
        record = {
            "case": case.name,
            "op": case.op,
            "target": f"sm_{arch}",
            "triton": triton.__version__,
            "mode": case.mode,
            "p_dtype": case.p_dtype,
            "z_dtype": case.z_dtype,
            "bias": case.bias,
            "B": case.batch,
            "d": case.d,
            "Dp": case.dp,
            **_blocks(launch, config),
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
            "candidate": str(config) in candidate_keys,
        }
        if case.op in ("fused", "transport"):
            transport = case.op == "transport"
            record["variant"] = resource_table.launch_variant(launch.meta, transport=transport)
            record["config_key"] = resource_table.config_key(config)
        if case.op == "fused":
            record["traffic"] = _traffic(case, launch, config)
        try:
            record.update(compile_config(launch, config))
            record["error"] = None
        except Exception as error:  # a compile error is a result: recorded, then it fails
            record["error"] = f"{type(error).__name__}: {str(error)[-1500:]}"
        records.append(record)
    return records


def problems(records: list[dict]) -> list[str]:
    """Why the gate fails, one line each (empty when it passes)."""
    from rela_kernels.triton import resource_table

    found = []
    for r in records:
        where = f"{r['case']} on {r['target']} (Triton {r['triton']}) {r.get('BLOCK_B')}x"
        where += f"{r.get('BLOCK_D')}x{r.get('BLOCK_K')} w{r['num_warps']} s{r['num_stages']}"
        if r["error"] is not None:
            found.append(f"compile error: {where}: {r['error'].splitlines()[0]}")
        elif r["candidate"] and not resource_table.fits(target_arch(r["target"]), r):
            found.append(
                f"spills {r['spill_bytes']} bytes: {where}"
                if r["spill_bytes"] > 0
                else f"shared memory {r['shared']} bytes over the limit: {where}"
            )
    return found


def hopper_shape(records: list[dict]) -> dict[str, dict | None]:
    """Per mode (loss, grad, hist-largest): the best candidate of the benchmark shape on sm_90,
    bf16, with BLOCK_B >= 64, wgmma and no spill (the fewest predicted L2 bytes); None when
    there is none. Only modes the records cover are listed."""
    best: dict[str, dict | None] = {}
    for r in records:
        if not (
            r["op"] == "fused" and r["target"] == "sm_90" and r["p_dtype"] == "bfloat16"
            and r["z_dtype"] == "bfloat16" and r["B"] == BENCH_B and r["d"] == BENCH_D
            and r["Dp"] == BENCH_DP and r["mode"] in ("loss", "grad", "hist-largest")
        ):  # fmt: skip
            continue
        best.setdefault(r["mode"], None)
        if (
            r["error"] is None and r["candidate"] and r["BLOCK_B"] >= 64 and r["wgmma"] > 0
            and r["spill_bytes"] == 0
        ):  # fmt: skip
            current = best[r["mode"]]
            if current is None or r["traffic"]["l2_bytes"] < current["traffic"]["l2_bytes"]:
                best[r["mode"]] = r
    return best


def calibrated_table(records: list[dict], previous: dict) -> dict:
    """``previous`` with this run's Triton version replaced: per target, variant and config, the
    worst registers, spills and shared memory over the cases compiled."""
    from rela_kernels.triton import resource_table

    table = {k: v for k, v in previous.items()}
    versions = {resource_table.version_key(r["triton"]) for r in records}
    for version in versions:
        table[version] = {}
    for r in records:
        if "variant" not in r or r["error"] is not None:
            continue
        version = resource_table.version_key(r["triton"])
        arch = str(target_arch(r["target"]))
        entry = table[version].setdefault(arch, {}).setdefault(r["variant"], {})
        worst = entry.setdefault(r["config_key"], {"registers": 0, "spill_bytes": 0, "shared": 0})
        for key in worst:
            worst[key] = max(worst[key], r[key])
    return {v: table[v] for v in sorted(table)}


def write_table(table: dict) -> None:
    from rela_kernels.atomic_io import atomic_write_text
    from rela_kernels.triton import resource_table

    document = {
        "about": "Written by `python benchmarks/compile_gate.py --calibrate` (make "
        "gpu-compile-calibrate): per Triton version, target and kernel variant, the worst "
        "registers, spill bytes and shared memory ptxas reported for each configuration.",
        "resources": table,
    }
    atomic_write_text(resource_table.TABLE_PATH, json.dumps(document, indent=1, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSONL file for the records")
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS))
    parser.add_argument("--subset", action="store_true", help="only the quick subset")
    parser.add_argument("--calibrate", action="store_true", help="rewrite the resource table")
    parser.add_argument("--triton-path", type=Path, help="a directory to import Triton from")
    parser.add_argument(
        "--from-records",
        type=Path,
        help="judge the records of an earlier run (same Triton) instead of compiling",
    )
    parser.add_argument("--summary", type=Path, help="also write the summary as JSON here")
    parser.add_argument(
        "--results-dir",
        type=Path,
        help="write compile_gate-tritonVERSION.jsonl and -summary.json here",
    )
    parser.add_argument(
        "--nvcc-out", type=Path, help="also compile csrc/cuda with nvcc -cubin; records here"
    )
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET"):
        print(
            "compile_gate: unset TRITON_INTERPRET (the kernels must be compiled)", file=sys.stderr
        )
        return 2
    if args.triton_path is not None:
        if not (args.triton_path / "triton" / "__init__.py").is_file():
            print(f"compile_gate: no Triton in {args.triton_path}", file=sys.stderr)
            return 2
        sys.path.insert(0, str(args.triton_path))
    sys.path.insert(0, str(ROOT))
    # A fresh cache: a cached kernel would skip ptxas and so its report.
    cache = tempfile.mkdtemp(prefix="rela-compile-gate-")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        return _gate(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _gate(args: argparse.Namespace) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, unwarned
    warnings.filterwarnings("ignore", category=UserWarning, module="triton")
    import triton

    from rela_kernels.atomic_io import atomic_write_text
    from rela_kernels.triton import cosine_loss as kernels
    from rela_kernels.triton import resource_table

    assert not kernels.is_interpreted()
    began = time.monotonic()
    records = []
    if args.from_records is not None:
        records = [json.loads(line) for line in args.from_records.read_text().splitlines()]
        if {r["triton"] for r in records} != {triton.__version__}:
            print(f"compile_gate: {args.from_records} is not from Triton {triton.__version__}",
                  file=sys.stderr)  # fmt: skip
            return 2
        records = [r for r in records if target_arch(r["target"]) in args.targets]
    for arch in args.targets if args.from_records is None else ():
        for case in CASES:
            if arch in case.subset or not args.subset:
                records += run_case(case, arch, every_config=args.calibrate)
    cases = [c for c in CASES if not args.subset or set(c.subset) & set(args.targets)]
    if args.calibrate:
        write_table(calibrated_table(records, resource_table.load_table()))
        resource_table.reload()
        # The candidates as the new table prunes them (the autotuners cache nothing of it).
        for arch in args.targets:
            triton.runtime.driver.set_active(TargetDriver(arch))
            for case in (c for c in cases if c.op in ("fused", "transport")):
                keys = {resource_table.config_key(c) for c in launch_of(case, arch).candidates()}
                for r in records:
                    if r["case"] == case.name and r["target"] == f"sm_{arch}":
                        r["candidate"] = r["config_key"] in keys
    found = problems(records)
    nvcc = shutil.which("nvcc")
    if args.nvcc_out is not None and nvcc is None:
        found.append("--nvcc-out: nvcc not found on PATH")
    elif args.nvcc_out is not None:
        with tempfile.TemporaryDirectory() as workdir:
            cuda = nvcc_records(nvcc, args.targets, Path(workdir))
        atomic_write_text(args.nvcc_out, "".join(json.dumps(r) + "\n" for r in cuda))
        found += [f"nvcc failed: {r['source']} for {r['target']}" for r in cuda if r["error"]]
        found += [
            f"nvcc: {r['kernel']} spills {r['spill_bytes']} bytes on {r['target']}"
            for r in cuda
            if r["error"] is None and r["spill_bytes"] > 0
        ]
    hopper = hopper_shape(records)
    found += [f"no Hopper-shaped candidate for the {mode}" for mode, r in hopper.items() if not r]
    summary = {
        "triton": triton.__version__,
        "targets": [f"sm_{a}" for a in args.targets],
        "cases": len(cases),
        "compiled": len(records),
        "candidates": sum(r["candidate"] for r in records),
        "errors": sum(r["error"] is not None for r in records),
        "candidate_spills": sum(
            r["candidate"] and r["error"] is None and r["spill_bytes"] > 0 for r in records
        ),
        "spills_outside_candidates": sum(
            not r["candidate"] and r["error"] is None and r["spill_bytes"] > 0 for r in records
        ),
        "hopper": {
            mode: None if r is None else {
                k: r[k] for k in ("BLOCK_B", "BLOCK_K", "num_warps", "num_stages", "registers",
                                  "spill_bytes", "shared", "wgmma")
            } | {"l2_over_hbm": round(r["traffic"]["l2_over_hbm"], 2),
                 "predicted_ms": round(r["traffic"]["predicted_ms"], 4)}
            for mode, r in hopper.items()
        },
        "problems": found,
        "from_records": None if args.from_records is None else str(args.from_records),
        "seconds": round(time.monotonic() - began, 1),
    }  # fmt: skip
    if args.results_dir is not None:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        stem = f"compile_gate-triton{triton.__version__}"
        args.out = args.out or args.results_dir / f"{stem}.jsonl"
        args.summary = args.summary or args.results_dir / f"{stem}-summary.json"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
    if args.summary is not None:
        atomic_write_text(args.summary, json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
