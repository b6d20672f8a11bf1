"""Shared benchmark helpers: timing, peak memory, environment record, result files.

Every figure is appended as one JSON line with the device, versions and git sha it came from,
so a result in benchmarks/results/ always says where it was measured.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(
    fn: Callable[[], object],
    warmup: int = 3,
    repeat: int = 10,
    device: torch.device | str | None = None,
) -> float:
    """Median wall time of ``fn()`` in seconds (synchronising CUDA around each call)."""
    if device is not None and torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graph_median_time(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Median seconds of ``fn()`` replayed from a CUDA graph: the device's work alone.

    :func:`median_time` of a short call measures the host's per-call work as well whenever the
    device waits for it; a graph replays the same kernels with one launch. None on other devices,
    and where the call cannot be captured (a host sync inside, say): then it prints why.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        # Warm up on a side stream (autotuning, lazy allocations), as capture requires.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as error:
        print(f"  (not captured in a CUDA graph: {str(error).splitlines()[0]})")
        return None
    return median_time(graph.replay, device=device)


def interleaved_median_times(
    fns: dict[str, Callable[[], object]], warmup: int = 3, repeat: int = 20, calls: int = 1
) -> dict[str, float]:
    """Median seconds per call of each CPU function, timed round-robin.

    Each repeat times every function once, so a transient slowdown of the machine (other
    processes, a noisy VM neighbour) lands on all of them alike instead of on whichever happened
    to run then; ratios between them stay meaningful. ``calls`` back-to-back calls make one
    sample (for functions too short for the clock to time one call).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak memory allocated while ``fn()`` runs, above what was allocated before.

    CUDA: the caching allocator's peak. CPU: torch's profiler memory accounting (allocations made
    by torch tensors, which is what the ops allocate).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Walk the allocation events in time order to find the high-water mark. Events nest (an op
    # includes its children's allocations), so only each event's own share counts; a free is often
    # attributed to an enclosing event that started earlier, so frees count at the event's end.
    changes = []
    for event in prof.events():
        amount = event.self_cpu_memory_usage
        if amount > 0:
            changes.append((event.time_range.start, amount))
        elif amount < 0:
            changes.append((event.time_range.end, amount))
    current = peak = 0
    for _, amount in sorted(changes, key=lambda change: (change[0], -change[1])):
        current += amount
        peak = max(peak, current)
    return peak


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# The records and plots the benchmarks and studies write: data, not code. A study that
# aggregates into them after each run must not make its own next record "dirty".
RESULTS_PATHSPEC = ":(exclude)benchmarks/results"


def git_state(root: Path | None = None) -> dict:
    """The commit the tree is at (``git_sha``), whether tracked files other than the results
    under ``benchmarks/results/`` differ from it (``dirty``) and, if they do, the sha256 of
    ``git diff HEAD`` over those files (``diff_sha256``: which changes). ``root``: the checkout
    (default: this one)."""
    root = root or Path(__file__).resolve().parent.parent

    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout

    try:
        sha = git("rev-parse", "HEAD").decode().strip()
        code = ("--", ".", RESULTS_PATHSPEC)
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", *code).strip())
        diff = hashlib.sha256(git("diff", "HEAD", "--binary", *code)).hexdigest() if dirty else None
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": "unknown", "dirty": None, "diff_sha256": None}
    return {"git_sha": sha, "dirty": dirty, "diff_sha256": diff}


def environment(device: torch.device | str = "cpu") -> dict:
    """Where a figure was measured: device name, core count, versions, the code (git sha, and
    whether the tree had uncommitted changes: :func:`git_state`), time."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        # Other work on the machine skews CPU timings; the 1-minute load average says how much.
        "load_average_1min": round(os.getloadavg()[0], 2),
        **git_state(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def append_result(path: str | os.PathLike[str], record: dict) -> None:
    """Append one JSON line to ``path`` (relative paths land in benchmarks/results/)."""
    path = Path(path)
    if not path.is_absolute():
        path = RESULTS / path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
