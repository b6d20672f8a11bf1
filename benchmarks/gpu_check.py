"""`make gpu-check`: prove the GPU path on a GPU machine in one short run.

For a machine with a CUDA device, a CUDA build of torch already installed for ``python3`` and
no network: nothing is installed. Stages, each under its own time limit (a hang costs at most
its own budget) and all under one overall deadline, so the whole run ends within 9 minutes:

1. build    the extension in place with its CUDA kernels (sm_90 only, to save compile time),
            unless the in-place extension already loads with its CUDA kernels: a rerun, or one
            compiled elsewhere for the same torch and Python (`make cuda-compile`, copied into
            rela_kernels/); env.json then names that file and its sha256. ``--rebuild``
            compiles regardless;
2. tests    ``pytest -m "cuda or interop"`` (JUnit XML and the log): the CUDA tests, and the
            exported ResNet-18/50 loaded strictly into torchvision and timm where they import
            (tests/test_backbone_interop.py; skipped with the reason elsewhere);
3. memcheck / racecheck: a few CUDA op tests under compute-sanitizer, where it runs;
4. bench-*  fused loss, select_topk, score_and_select, each candidate configuration of the
            fused loss on its own (with the traffic model's prediction and the autotuner's
            pick), the training step (BYOL and the ReLA phase), embed; every record (with GPU
            name, versions, git sha) to one JSONL file. The training step through the JPEG
            loader (bench-train-folder) and compiled (bench-train-compiled-byol, -rela) run only
            when ``--stages`` names them: they do not fit one run with the rest.

At most 8 files land in the output directory (a remote run hands back no more): env.json,
build.log, pytest.log, junit.xml, sanitizer.log, bench.log, bench.jsonl, summary.md. Without a
CUDA device it exits at once with status 2 and a one-line reason.

    python3 benchmarks/gpu_check.py --out build/gpu-check
    python3 benchmarks/gpu_check.py --out DIR \
        --stages bench-train-folder,bench-train-compiled-byol,bench-train-compiled-rela
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 530  # the whole run, inside the 10 minutes a remote command is given
# (stage, seconds): each stage's own limit; a stage also stops at the overall deadline. Set from
# the stage times of a run on an H200 with 16 CPUs (docs/benchmarks.md, "First run on an H200").
BUDGET = {
    "build": 150,
    "tests": 200,
    "memcheck": 25,
    "racecheck": 35,
    "bench-loss": 35,
    "bench-select": 30,
    "bench-score": 45,
    # Each candidate config of the fused loss alone; bench-loss's autotuning compiled them.
    "bench-configs": 25,
    "bench-train": 45,
    "bench-embed": 15,
    # Run only when named: together they do not fit one run with the rest.
    # The real input pipeline: ImageNet-sized JPEGs generated, decoded by the preset's workers.
    "bench-train-folder": 170,
    # Compiling ResNet-50 dominates (over 50 s there); the ReLA variant's backbone then hits
    # inductor's cache.
    "bench-train-compiled-byol": 240,
    "bench-train-compiled-rela": 120,
}
OPTIONAL_STAGES = ("bench-train-folder", "bench-train-compiled-byol", "bench-train-compiled-rela")
DEFAULT_STAGES = tuple(stage for stage in BUDGET if stage not in OPTIONAL_STAGES)
# A small subset of the CUDA op tests that exercises every kernel once, for the sanitizers.
SANITIZER_TESTS = (
    "cuda- and ((test_losses_and_transport_match_reference and dtype2 and 17-64-384)"
    " or (test_gradients_match_reference and dtype0 and 257-33 and none-True)"
    " or (test_select_topk_non_contiguous and dtype0 and 40000)"
    " or (test_score_and_select and dtype1 and 301 and -contiguous))"
)
FILES = (
    "env.json",
    "build.log",
    "pytest.log",
    "junit.xml",
    "sanitizer.log",
    "bench.log",
    "bench.jsonl",
    "summary.md",
)


@dataclass
class Stage:
    name: str
    # ok, failed (rc N), timeout (N s), skipped (tool missing, or a prebuilt extension),
    # not selected (--stages), not run (deadline)
    status: str
    seconds: float
    note: str = ""


def cuda_reason() -> str | None:
    """None when python3's torch sees a CUDA device, else why not (one line)."""
    try:
        import torch
    except ImportError as error:
        return f"torch is not importable ({error})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda})"
    return None


def _command_output(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=ROOT)
        return done.stdout.strip() if done.returncode == 0 else f"unavailable ({done.returncode})"
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"


def environment() -> dict:
    import torch
    from common import git_state  # benchmarks/, the script's directory; imports torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    props = torch.cuda.get_device_properties(0)
    smi = _command_output(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    return {
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "nvidia_smi": smi,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "nvcc": _command_output(["nvcc", "--version"]).splitlines()[-1:],
        "compute_sanitizer": shutil.which("compute-sanitizer"),
        "python": platform.python_version(),
        # git_sha, dirty, diff_sha256: the same code identity as every benchmark record.
        **git_state(),
        "cpus": os.cpu_count(),
    }


class Runner:
    def __init__(self, out: Path, selected: tuple[str, ...] = DEFAULT_STAGES) -> None:
        self.out = out
        self.selected = selected
        self.start = time.monotonic()
        self.stages: list[Stage] = []
        self.env = dict(os.environ)
        path = [str(ROOT), str(ROOT / "python"), self.env.get("PYTHONPATH", "")]
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.pop("TRITON_INTERPRET", None)  # the kernels must be compiled for the device

    def remaining(self) -> float:
        return DEADLINE_S - (time.monotonic() - self.start)

    def run(self, name: str, command: list[str], log: str, env: dict | None = None) -> Stage:
        if name not in self.selected:
            return self.record(Stage(name, "not selected", 0.0))
        limit = min(BUDGET[name], self.remaining() - 5)
        if limit < 1:
            stage = Stage(name, "not run", 0.0, "overall deadline reached")
            return self.record(stage)
        began = time.monotonic()
        with open(self.out / log, "a", encoding="utf-8") as handle:
            handle.write(f"\n===== {name}: {' '.join(command)} (limit {limit:.0f} s)\n")
            handle.flush()
            # A process group of its own (setsid), so that a timeout ends the whole tree (test
            # workers, compile pools, the sanitized process), not just the first process.
            child = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env or self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc = child.wait(timeout=limit)
                status = "ok" if rc == 0 else f"failed (rc {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                status = f"timeout ({limit:.0f} s)"
            handle.write(f"===== {name}: {status}\n")
        return self.record(Stage(name, status, time.monotonic() - began))

    def record(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        total = time.monotonic() - self.start
        print(f"[gpu-check] {stage.name:<22} {stage.status:<20} {stage.seconds:6.1f} s "
              f"(total {total:6.1f} s) {stage.note}", flush=True)  # fmt: skip
        return stage


# Run by this Python in the tree: whether the in-place extension loads and holds a CUDA kernel
# for every rela op (the build stage is then not needed).
_LOADS_WITH_CUDA = """
import importlib.util, json, sys, torch
import rela_kernels  # loads the extension where one is built
spec = importlib.util.find_spec("rela_kernels._C")
ops = sys.argv[1].split(",")
has = torch._C._dispatch_has_kernel_for_dispatch_key
print(json.dumps({"file": spec.origin if spec else None, "ops": ops,
                  "without_cuda": [op for op in ops if not has("rela::" + op, "CUDA")]}))
"""


def declared_ops() -> list[str]:
    """The ops csrc/rela.cpp declares (its ``m.def("name(...`` lines)."""
    text = (ROOT / "csrc" / "rela.cpp").read_text(encoding="utf-8")
    return re.findall(r'm\.def\(\s*"([A-Za-z_]\w*)\(', text)


def loadable_extension(py: str, env: dict) -> dict | None:
    """The in-place extension's file, size and sha256 when it already loads here with a CUDA
    kernel for every op; None when it is missing, fails to load or lacks a CUDA kernel."""
    ops = ",".join(declared_ops())
    try:
        done = subprocess.run([py, "-c", _LOADS_WITH_CUDA, ops], cwd=ROOT, env=env, timeout=60,
                              capture_output=True, text=True)  # fmt: skip
        report = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None
    if not report.get("ops") or report.get("without_cuda") or not report.get("file"):
        return None
    path = Path(report["file"])
    data = path.read_bytes()
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def pytest_command(py: str, *args: str) -> list[str]:
    command = [py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", *args]
    if importlib.util.find_spec("pytest_timeout") is not None:
        # The slowest test, the torchvision/timm interop, took 121 s beside 13 other workers.
        command += ["--timeout", "180"]
    return command


def junit_counts(path: Path) -> str:
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return "no JUnit file"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {
        key: sum(int(s.get(key, 0)) for s in suites)
        for key in ("tests", "failures", "errors", "skipped")
    }
    return ", ".join(f"{v} {k}" for k, v in totals.items())  # fmt: skip


def sanitizer_summary(path: Path) -> str:
    if not path.is_file():
        return "not run"
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    found = [line for line in lines if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
    return "; ".join(found) or "no summary line (see sanitizer.log)"


def _fmt(value: object, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _graph(ms: object) -> str:
    """The device-only time of a figure (a CUDA graph's replay), where there is one."""
    return f" [graph {ms:.3f}]" if isinstance(ms, float) else ""


def _row(*cells: str) -> str:
    """One row of a Markdown table; an empty cell stays a single space."""
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def bench_table(path: Path) -> list[str]:
    if not path.is_file():
        return ["(no benchmark records)"]
    rows = [
        "| benchmark | variant | shape | figure | baseline | ratio | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("benchmark") == "transported_cosine_loss":
            rows.append(
                _row(
                    "loss fwd+bwd",
                    r["backend"],
                    f"B={r['B']} Dp={r['Dp']} d={r['d']} {r['dtype']}",
                    f"{_fmt(r['forward_backward_ms'])} ms (fwd {_fmt(r['forward_ms'])})"
                    + _graph(r.get("graph_forward_backward_ms")),
                    f"eager {_fmt(r['eager_forward_backward_ms'])} ms"
                    + _graph(r.get("eager_graph_forward_backward_ms"))
                    + f"; floor {_fmt(r['floor_ms'])} ms",
                    f"{_fmt(r['speedup_forward_backward'])}x eager, "
                    f"{_fmt(r['forward_backward_over_floor'])}x floor",
                    ">=3x eager, <=1.7x floor",
                )
            )
        elif r.get("op") == "select_topk":
            rows.append(
                _row(
                    "select_topk",
                    r["backend"],
                    f"N={r['shape'][0]} k={r['k']} {r['dtype']}",
                    f"{_fmt(r['median_ms'], 3)} ms" + _graph(r.get("graph_ms")),
                    f"torch.topk {_fmt(r['baseline_ms'], 3)} ms; + sort "
                    f"{_fmt(r.get('baseline_sorted_ms'), 3)} ms"
                    + _graph(r.get("baseline_sorted_graph_ms")),
                    f"{_fmt(r['ratio'])}x",
                    ">=2x",
                )
            )
        elif r.get("op") == "score_and_select":
            shape = r["shape"]
            rows.append(
                _row(
                    "score_and_select",
                    r["backend"],
                    f"N={shape['N']} Dp={shape['Dp']} d={shape['d']} {r['dtype']}",
                    f"{_fmt(r['median_ms'], 3)} ms" + _graph(r.get("graph_ms")),
                    f"read p {_fmt(r.get('read_p_ms'), 3)} ms",
                    f"{_fmt(r.get('over_read_p'))}x read p",
                    "<=1.5x",
                )
            )
        elif r.get("benchmark") == "fused_config":
            pick = " (autotuner's pick)" if r["chosen"] else ""
            rows.append(
                _row(
                    "fused config",
                    f"{r['config']}{pick}",
                    f"B={r['B']} Dp={r['Dp']} d={r['d']} {r['dtype']} {r['mode']}",
                    f"{_fmt(r['measured_ms'], 3)} ms",
                    f"predicted {_fmt(r['predicted_ms'], 3)} ms ({r['predicted_bound']}-bound)",
                    f"{_fmt(r['measured_over_predicted'])}x predicted",
                    f"L2 {_fmt(r['l2_over_hbm'])}x floor (<=3x)",
                )
            )
        elif r.get("benchmark") == "embed":
            rows.append(
                _row(
                    "embed",
                    r["prior"],
                    f"{r['input_size']} px, batch {r['batch_size']}",
                    f"{r['images_per_s']:.0f} img/s",
                    "",
                    "",
                    "",
                )
            )
        elif "images_per_s" in r:  # bench_train
            rows.append(
                _row(
                    # "loader": the JPEG loader alone, in the phase named as the variant
                    "JPEG loader alone"
                    if r.get("data") == "loader"
                    else f"train step ({r.get('data')})",
                    f"{r.get('variant')} compile={r.get('compile')}",
                    f"{r.get('arch')} {r.get('image_size')} px, batch {r.get('batch_size')}",
                    f"{r['images_per_s']:.0f} img/s",
                    "",
                    "",
                    "" if r.get("data") == "loader" else "BYOL >=2000 img/s; ReLA <= BYOL step",
                )
            )
    return rows


def write_summary(runner: Runner, env: dict) -> None:
    out = runner.out
    lines = [
        f"# gpu-check: {env.get('gpu')} ({env.get('nvidia_smi')})",
        "",
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
        f"python {env.get('python')}, git {env.get('git_sha')}"
        f"{' (dirty)' if env.get('dirty') else ''}",
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
        *[f"| {s.name} | {s.status} {s.note} | {s.seconds:.1f} |" for s in runner.stages],
        "",
        f"Tests (`pytest -m cuda`): {junit_counts(out / 'junit.xml')}",
        "",
        f"compute-sanitizer: {sanitizer_summary(out / 'sanitizer.log')}",
        "",
        *bench_table(out / "bench.jsonl"),
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines), encoding="utf-8")


def stage_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in BUDGET]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected stage names from {', '.join(BUDGET)}, got {text!r}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check")
    parser.add_argument(
        "--stages",
        type=stage_list,
        default=DEFAULT_STAGES,
        help=f"comma-separated stages to run (default: all but {', '.join(OPTIONAL_STAGES)}, "
        f"which do not fit one run with the rest); of: {', '.join(BUDGET)}",
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="compile the extension even when the in-place one already loads with CUDA kernels",
    )
    args = parser.parse_args(argv)
    reason = cuda_reason()
    if reason is not None:
        print(f"gpu-check: needs a CUDA machine: {reason}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # a rerun starts clean: the files describe this run only
        (out / name).unlink(missing_ok=True)
    runner = Runner(out, args.stages)
    py = sys.executable
    prebuilt = None if args.rebuild else loadable_extension(py, runner.env)
    env = environment() | ({} if prebuilt is None else {"prebuilt_extension": prebuilt})
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(f"[gpu-check] {env['gpu']} | torch {env['torch']} | triton {env['triton']} | "
          f"git {env['git_sha']} | output {out}", flush=True)  # fmt: skip

    if prebuilt is not None:
        note = f"{prebuilt['file']} loads with CUDA kernels (sha256 {prebuilt['sha256'][:12]})"
        build = runner.record(Stage("build", "skipped", 0.0, note))
    else:
        build_env = dict(runner.env, RELA_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0")
        build_env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        command = [py, "setup.py", "build_ext", "--inplace"]
        build = runner.run("build", command, "build.log", build_env)

    tests = pytest_command(py, "-m", "cuda or interop", f"--junitxml={out / 'junit.xml'}")
    if importlib.util.find_spec("xdist") is not None:
        # Triton compiles per worker process: spread them over the CPUs, keeping two for the
        # tests that start processes of their own.
        tests += ["-n", str(max(1, (os.cpu_count() or 4) - 2))]
    # Each test worker's torch.compile would otherwise start a compile pool of every CPU.
    runner.run("tests", tests, "pytest.log", dict(runner.env, TORCHINDUCTOR_COMPILE_THREADS="2"))

    sanitizer = shutil.which("compute-sanitizer")
    for tool in ("memcheck", "racecheck"):
        if sanitizer is None or build.status not in ("ok", "skipped"):
            why = "compute-sanitizer not found" if sanitizer is None else "extension not built"
            runner.record(Stage(tool, "skipped", 0.0, why))
            continue
        # The caching allocator would hide out-of-bounds accesses inside its pool.
        uncached = dict(runner.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        command = [sanitizer, "--tool", tool, "--target-processes", "all", "--error-exitcode", "9"]
        command += pytest_command(
            py, "-m", "cuda", "-x", "tests/test_cuda_ops.py", "-k", SANITIZER_TESTS
        )
        runner.run(tool, command, "sanitizer.log", uncached)

    records = str(out / "bench.jsonl")
    bench = ROOT / "benchmarks"
    runner.run(
        "bench-loss",
        [py, str(bench / "bench_loss.py"), "--device", "cuda", "--dtype", "bfloat16"]
        + ["--out", records],
        "bench.log",
    )
    select = [py, str(bench / "bench_select.py"), "--device", "cuda", "--out", records]
    runner.run(
        "bench-select",
        [*select, "--sizes", "10000000", "100000000", "--dtype", "float32", "--skip-score"],
        "bench.log",
    )
    runner.run(
        "bench-score",
        [*select, "--skip-select", "--score-shape", "1048576", "768", "256", "--dtype", "bfloat16"],
        "bench.log",
    )
    runner.run(
        "bench-configs",
        [py, str(bench / "bench_fused_configs.py"), "--device", "cuda", "--out", records],
        "bench.log",
    )
    train = [py, str(bench / "bench_train.py"), "--data", "device", "--device", "cuda"]
    train += ["--steps", "20", "--warmup", "5", "--results", records]
    runner.run("bench-train", [*train, "--variants", "byol,rela", "--compile", "off"], "bench.log")
    runner.run(
        "bench-embed",
        [py, str(bench / "bench_embed.py"), "--device", "cuda", "--out", records],
        "bench.log",
    )
    folder = [py, str(bench / "bench_train.py"), "--data", "folder", "--device", "cuda"]
    folder += ["--steps", "20", "--warmup", "5", "--results", records, "--variants", "byol,rela"]
    runner.run("bench-train-folder", folder, "bench.log")
    for variant in ("byol", "rela"):  # one stage each: a timeout loses only its own record
        command = [*train, "--variants", variant, "--compile", "on"]
        runner.run(f"bench-train-compiled-{variant}", command, "bench.log")

    write_summary(runner, env)
    total = time.monotonic() - runner.start
    print(
        f"[gpu-check] done in {total:.1f} s; files in {out}: {', '.join(sorted(os.listdir(out)))}"
    )
    print((out / "summary.md").read_text())
    return 0 if all(s.status in ("ok", "skipped", "not selected") for s in runner.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
