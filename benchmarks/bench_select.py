"""Top-k selection against torch.topk, and fused score-and-select against the eager composition.

``select_topk`` (k indices, ascending, ties to the lower index) is compared with
``torch.topk(sorted=False)`` (the fastest torch call, but an unordered result with unspecified
ties) and with ``torch.topk`` followed by the index sort that gives select_topk's output.
``score_and_select`` is compared with reference transport + cosine loss + topk + index sort.
Each figure is the median over repeats after warmup, measured in the same run as its baselines,
and appended as a JSON line to benchmarks/results/select.jsonl.

    python benchmarks/bench_select.py                 # CPU: N in {1e6, 1e7}
    python benchmarks/bench_select.py --device cuda   # GPU: N in {1e6, 1e7, 1e8}
    python benchmarks/bench_select.py --quick         # small smoke run, nothing saved
"""

from __future__ import annotations

import argparse
import datetime
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rela_kernels as rk  # noqa: E402
from benchmarks.common import (  # noqa: E402
    append_result,
    environment,
    graph_median_time,
    median_time,
    peak_memory_bytes,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FRACTIONS = (0.01, 0.1, 0.5)


def select_backends(device: torch.device) -> list[str]:
    """Compiled select backends for the device (triton selects with the CUDA kernel, so it is
    not measured separately); the reference only when nothing is compiled."""
    status = rk.backends.available()
    wanted = ("cuda",) if device.type == "cuda" else ("cpu",)
    names = [b for b in wanted if status[b].usable]
    return names or ["reference"]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def milliseconds(fn, args, device: torch.device) -> float:
    return median_time(fn, args.warmup, args.repeat, device) * 1e3


def graph_milliseconds(fn, device: torch.device) -> float | None:
    """The device's work alone (a CUDA graph's replay), rounded; None off CUDA or uncaptured."""
    seconds = graph_median_time(fn, device)
    return None if seconds is None else round(seconds * 1e3, 4)


def topk_then_sort(scores: torch.Tensor, k: int) -> torch.Tensor:
    """torch's way to select_topk's output (up to the choice among tied scores)."""
    return torch.sort(torch.topk(scores, k, sorted=False).indices).values


def check_same_selection(ours: torch.Tensor, scores: torch.Tensor, k: int) -> None:
    """The selected values equal torch.topk's (tie-robust check; torch's tie choice differs)."""
    want = torch.topk(scores, k, sorted=True).values.float()
    got = torch.sort(scores[ours].float(), descending=True).values
    if not torch.equal(got, want):
        raise AssertionError("select_topk disagrees with torch.topk")
    if k > 1 and not bool((ours[1:] > ours[:-1]).all()):
        raise AssertionError("select_topk output is not strictly ascending")


def bench_select_topk(args, device: torch.device, env: dict) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    for n in args.sizes:
        for dtype_name in args.dtype:
            scores = torch.randn(n, generator=g).to(DTYPES[dtype_name]).to(device)
            for fraction in FRACTIONS:
                k = max(1, int(n * fraction))
                topk_ms = milliseconds(partial(torch.topk, scores, k, sorted=False), args, device)
                sorted_topk = partial(topk_then_sort, scores, k)
                topk_sorted_ms = milliseconds(sorted_topk, args, device)
                topk_sorted_graph_ms = graph_milliseconds(sorted_topk, device)
                for backend in select_backends(device):
                    run = partial(rk.select_topk, scores, k, backend=backend)
                    check_same_selection(run(), scores, k)
                    ms = milliseconds(run, args, device)
                    graph_ms = graph_milliseconds(run, device)
                    record = {
                        "op": "select_topk",
                        "backend": backend,
                        "shape": [n],
                        "dtype": dtype_name,
                        "k": k,
                        "median_ms": round(ms, 4),
                        "baseline": "torch.topk(sorted=False)",
                        "baseline_ms": round(topk_ms, 4),
                        "ratio": round(topk_ms / ms, 3),
                        "baseline_sorted": "torch.topk(sorted=False) + sort(indices)",
                        "baseline_sorted_ms": round(topk_sorted_ms, 4),
                        "ratio_sorted": round(topk_sorted_ms / ms, 3),
                        # Replayed from CUDA graphs: the device's work without the host's.
                        "graph_ms": graph_ms,
                        "baseline_sorted_graph_ms": topk_sorted_graph_ms,
                        # Bytes of scores read once over the time: the kernel reads them 2-3
                        # times, so this is a lower bound of the bandwidth used.
                        "input_gb_per_s": round(n * scores.element_size() / (ms * 1e-3) / 1e9, 2),
                        "warmup": args.warmup,
                        "repeat": args.repeat,
                        **env,
                        "timestamp": now(),
                    }
                    print(
                        f"select_topk  {backend:9s} N={n:<10d} {dtype_name:8s} k={k:<9d} "
                        f"{ms:9.3f} ms | topk {topk_ms:9.3f} ms ({topk_ms / ms:5.2f}x) | "
                        f"topk+sort {topk_sorted_ms:9.3f} ms ({topk_sorted_ms / ms:5.2f}x)"
                    )
                    if not args.no_save:
                        append_result(args.out, record)


def eager_score_and_select(z, p, t: rk.Transport, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a user writes without this library (materialises the [N, d] targets)."""
    y = (p.float() - t.mean) @ t.matrix
    if t.bias is not None:
        y = y + t.bias
    losses = 1 - F.cosine_similarity(z.float(), y, dim=1, eps=1e-8)
    indices = torch.sort(torch.topk(losses, k, sorted=False).indices).values
    return indices, losses


def bench_score_and_select(args, device: torch.device, env: dict) -> None:
    n, dp, d = args.score_shape
    g = torch.Generator(device="cpu").manual_seed(1)
    t = rk.Transport(
        torch.randn(dp, generator=g), torch.randn(dp, d, generator=g) / dp**0.5, torch.randn(d)
    ).to(device)
    k = max(1, n // 10)
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        z = torch.randn(n, d, generator=g).to(dtype).to(device)
        p = torch.randn(n, dp, generator=g).to(dtype).to(device)
        with torch.no_grad():
            eager = partial(eager_score_and_select, z, p, t, k)
            eager_ms = milliseconds(eager, args, device)
            # The floor of a one-pass op: reading p once (a sum reads every element, writes one).
            read_p_ms = milliseconds(partial(torch.sum, p), args, device)
            eager_peak = peak_memory_bytes(eager, device)
            backends = [b for b in select_backends(device) if b != "reference"]
            if device.type == "cuda" and rk.backends.available()["triton"].usable:
                backends.append("triton")
            for backend in backends or ["reference"]:
                run = partial(rk.score_and_select, z, p, t, k, backend=backend)
                indices, losses = run()
                torch.testing.assert_close(losses, eager()[1], rtol=1e-3, atol=1e-3)
                ms = milliseconds(run, args, device)
                graph_ms = graph_milliseconds(run, device)
                peak = peak_memory_bytes(run, device)
                record = {
                    "op": "score_and_select",
                    "backend": backend,
                    "shape": {"N": n, "Dp": dp, "d": d},
                    "dtype": dtype_name,
                    "k": k,
                    "median_ms": round(ms, 4),
                    "baseline": "eager transport + cosine_similarity + topk + sort",
                    "baseline_ms": round(eager_ms, 4),
                    "ratio": round(eager_ms / ms, 3),
                    "read_p_ms": round(read_p_ms, 4),
                    "over_read_p": round(ms / read_p_ms, 3),
                    "graph_ms": graph_ms,  # replayed from a CUDA graph: the device's work alone
                    "peak_mb": round(peak / 2**20, 2),
                    "baseline_peak_mb": round(eager_peak / 2**20, 2),
                    "warmup": args.warmup,
                    "repeat": args.repeat,
                    **env,
                    "timestamp": now(),
                }
                print(
                    f"score_and_select {backend:9s} N={n} Dp={dp} d={d} {dtype_name:8s} k={k} "
                    f"{ms:9.3f} ms | eager {eager_ms:9.3f} ms ({eager_ms / ms:5.2f}x) | "
                    f"read p {read_p_ms:9.3f} ms ({ms / read_p_ms:5.2f}x) | "
                    f"peak {peak / 2**20:.1f} MiB vs {eager_peak / 2**20:.1f} MiB"
                )
                if not args.no_save:
                    append_result(args.out, record)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append")
    parser.add_argument("--sizes", type=int, nargs="+", help="N values for select_topk")
    parser.add_argument("--score-shape", type=int, nargs=3, metavar=("N", "DP", "D"), default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats, no save")
    parser.add_argument("--skip-score", action="store_true", help="only select_topk")
    parser.add_argument("--skip-select", action="store_true", help="only score_and_select")
    parser.add_argument("--out", default="select.jsonl", help="file under benchmarks/results/")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ["float32"]
    if args.quick:
        args.sizes = args.sizes or [100_000]
        args.score_shape = args.score_shape or [2048, 96, 32]
        args.warmup, args.repeat, args.no_save = 1, 3, True
    if args.sizes is None:
        args.sizes = [10**6, 10**7] + ([10**8] if device.type == "cuda" else [])
    if args.score_shape is None:
        args.score_shape = [65536, 768, 256] if device.type == "cpu" else [1 << 20, 768, 256]
    env = environment(device)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}")
    if not args.skip_select:
        bench_select_topk(args, device, env)
    if not args.skip_score:
        bench_score_and_select(args, device, env)


if __name__ == "__main__":
    main()
