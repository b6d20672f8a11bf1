"""Fused transported cosine loss against the eager-torch composition.

For each backend usable on the device: forward and forward+backward median time, the ratio to
eager torch measured in the same run, peak memory of forward+backward, and the floor — on CPU the
bare ``p @ matrix`` product (the op cannot do less), on GPU the time to read ``p`` and ``z`` and
write the gradient once at the measured copy bandwidth. Results: benchmarks/results/loss.jsonl.

    python benchmarks/bench_loss.py                 # CPU target shape
    python benchmarks/bench_loss.py --device cuda   # GPU target shape
    python benchmarks/bench_loss.py --quick         # small smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rela_kernels as rk  # noqa: E402
from benchmarks.common import (  # noqa: E402
    append_result,
    environment,
    graph_median_time,
    interleaved_median_times,
    median_time,
    peak_memory_bytes,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eager_loss(z: torch.Tensor, p: torch.Tensor, t: rk.Transport) -> torch.Tensor:
    """What a user writes without this library."""
    y = (p.float() - t.mean) @ t.matrix
    if t.bias is not None:
        y = y + t.bias
    return (1 - F.cosine_similarity(z.float(), y, dim=1, eps=1e-8)).mean()


def fused_loss(backend: str):
    def run(z: torch.Tensor, p: torch.Tensor, t: rk.Transport) -> torch.Tensor:
        return rk.transported_cosine_loss(
            z, p, t, reduction="mean", backend=backend, check_finite=False
        )

    return run


def loss_backends(device: torch.device) -> list[str]:
    """The reference and the compiled backends usable on the device (Triton on GPU only: the
    interpreter's speed means nothing)."""
    status = rk.backends.available()
    compiled = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    return ["reference"] + [name for name in compiled if status[name].usable]


def forward_backward(loss_fn, z, p, t):
    def run():
        z.grad = None
        loss_fn(z, p, t).backward()

    return run


def forward_only(loss_fn, z, p, t):
    def run():
        with torch.no_grad():
            loss_fn(z, p, t)

    return run


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device=device)
    return 2 * src.numel() / seconds


def bench(b: int, dp: int, d: int, dtype: torch.dtype, device: torch.device, repeat: int) -> list:
    g = torch.Generator(device="cpu").manual_seed(0)
    p = torch.randn(b, dp, generator=g).to(device=device, dtype=dtype)
    z = torch.randn(b, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    t = rk.Transport(torch.randn(dp, generator=g), torch.randn(dp, d, generator=g) / dp**0.5)
    t = t.to(device)
    env = environment(device)
    shape = {"B": b, "Dp": dp, "d": d, "dtype": str(dtype).replace("torch.", "")}

    chosen = loss_backends(device)
    fns = {
        "eager_fwd": forward_only(eager_loss, z, p, t),
        "eager_fb": forward_backward(eager_loss, z, p, t),
    }
    for name in chosen:
        fns[f"{name}_fwd"] = forward_only(fused_loss(name), z, p, t)
        fns[f"{name}_fb"] = forward_backward(fused_loss(name), z, p, t)
    graph_times: dict[str, float | None] = {}
    if device.type == "cuda":
        times = {name: median_time(fn, device=device) for name, fn in fns.items()}
        # The device's share of each recorded call: a short call timed alone also waits on the
        # host.
        recorded = ["eager_fb"] + [f"{name}_{call}" for name in chosen for call in ("fwd", "fb")]
        graph_times = {name: graph_median_time(fns[name], device) for name in recorded}
        bytes_moved = (p.numel() + 2 * z.numel()) * p.element_size()
        floor = bytes_moved / copy_bandwidth(device)
        floor_name = "read p and z, write grad at copy bandwidth"
    else:
        centred = (p.float() - t.mean).contiguous()
        fns["floor"] = lambda: torch.mm(centred, t.matrix)
        times = interleaved_median_times(fns, repeat=repeat)
        floor = times["floor"]
        floor_name = "bare (p - mean) @ matrix, float32, multithreaded MKL"
    eager_fwd, eager_fb = times["eager_fwd"], times["eager_fb"]
    # Measure from a clean slate: a z.grad left by an earlier call would be freed inside the
    # measured call and offset the peak.
    z.grad = None
    eager_mem = peak_memory_bytes(fns["eager_fb"], device)
    records = []
    for backend in chosen:
        fwd, fb = times[f"{backend}_fwd"], times[f"{backend}_fb"]
        z.grad = None
        mem = peak_memory_bytes(fns[f"{backend}_fb"], device)
        record = {
            "benchmark": "transported_cosine_loss",
            "backend": backend,
            **shape,
            "forward_ms": fwd * 1e3,
            "forward_backward_ms": fb * 1e3,
            "eager_forward_ms": eager_fwd * 1e3,
            "eager_forward_backward_ms": eager_fb * 1e3,
            "speedup_forward": eager_fwd / fwd,
            "speedup_forward_backward": eager_fb / fb,
            "floor_ms": floor * 1e3,
            "floor": floor_name,
            "forward_backward_over_floor": fb / floor,
            # Replayed from a CUDA graph (device work only); None on CPU or where not captured.
            "graph_forward_ms": _ms(graph_times.get(f"{backend}_fwd")),
            "graph_forward_backward_ms": _ms(graph_times.get(f"{backend}_fb")),
            "eager_graph_forward_backward_ms": _ms(graph_times.get("eager_fb")),
            "peak_memory_mb": mem / 2**20,
            "eager_peak_memory_mb": eager_mem / 2**20,
            "repeat": repeat,
            "timing": "median, round-robin over all variants"
            if device.type == "cpu"
            else "do_bench median",
            **env,
        }
        records.append(record)
    return records


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _fmt_ms(ms: float | None) -> str:
    return "not captured" if ms is None else f"{ms:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--out", default="loss.jsonl", help="file under benchmarks/results/")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        b, dp, d, repeat = 512, 128, 64, 3
    elif device.type == "cuda":
        b, dp, d, repeat = 65536, 768, 256, 20
    else:
        b, dp, d, repeat = 8192, 768, 256, 30
    dtypes = args.dtype or (
        ["bfloat16", "float32"] if device.type == "cuda" else ["float32", "bfloat16"]
    )
    print(
        f"{'backend':<10}{'dtype':<10}{'fwd ms':>9}{'fwd+bwd ms':>12}{'eager f+b':>11}"
        f"{'speedup':>9}{'/floor':>8}{'peak MB':>9}{'eager MB':>9}"
    )
    for name in dtypes:
        records_of_dtype = bench(b, dp, d, DTYPES[name], device, repeat)
        for record in records_of_dtype:
            print(
                f"{record['backend']:<10}{record['dtype']:<10}{record['forward_ms']:>9.2f}"
                f"{record['forward_backward_ms']:>12.2f}{record['eager_forward_backward_ms']:>11.2f}"
                f"{record['speedup_forward_backward']:>9.2f}{record['forward_backward_over_floor']:>8.2f}"
                f"{record['peak_memory_mb']:>9.1f}{record['eager_peak_memory_mb']:>9.1f}"
            )
            if not args.no_save and not args.quick:
                append_result(args.out, record)
        print(f"  floor ({record['floor']}): {record['floor_ms']:.2f} ms")
        if record["eager_graph_forward_backward_ms"] is not None:
            print("  replayed from a CUDA graph (device work only), fwd+bwd ms:")
            for row in records_of_dtype:
                print(f"    {row['backend']:<10}{_fmt_ms(row['graph_forward_backward_ms'])} "
                      f"(eager {row['eager_graph_forward_backward_ms']:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
