"""Host time per call of the public ops, at sizes where the kernels cost next to nothing.

On a GPU a call's host work (checking the arguments, choosing the backend, the dispatcher and
the autograd wrapper, the launch) overlaps the device's work only when the device has queued
work to do; for one small op timed alone the device waits on it. This measures that work on
the CPU: each public op on tiny CPU tensors with the C++ backend, against calling its compiled
``torch.ops.rela`` kernel directly (the part of the call no wrapper can remove) and against the
eager composition a user would write. Timed round-robin with interleaved medians, one thread.
Results: benchmarks/results/call_overhead.jsonl.

    python benchmarks/bench_call_overhead.py
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
    interleaved_median_times,
)

RESULTS = "call_overhead.jsonl"


def cases(batch: int, dp: int, d: int) -> dict[str, dict]:
    """Per op: the public call (forward and, for the losses, forward+backward), the bare
    compiled kernel and the eager composition."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, d, generator=gen, requires_grad=True)
    y = torch.randn(batch, d, generator=gen)
    p = torch.randn(batch, dp, generator=gen)
    t = rk.Transport(
        torch.randn(dp, generator=gen),
        torch.randn(dp, d, generator=gen),
        torch.randn(d, generator=gen),
    )
    scores = torch.randn(batch, generator=gen)
    k = batch // 2
    ops = torch.ops.rela

    def eager_transported():
        target = (p - t.mean) @ t.matrix + t.bias
        return (1 - F.cosine_similarity(z, target, dim=1, eps=1e-8)).mean()

    return {
        "transported_cosine_loss": {
            "forward": lambda: rk.transported_cosine_loss(z, p, t, reduction="mean"),
            "forward_backward": lambda: rk.transported_cosine_loss(
                z, p, t, reduction="mean"
            ).backward(),
            "kernel": lambda: ops.transported_cosine_loss_fwd(
                z.detach(), p, t.mean, t.matrix, t.bias, 1e-8, True
            ),
            "eager": eager_transported,
            "eager_backward": lambda: eager_transported().backward(),
        },
        "cosine_loss": {
            "forward": lambda: rk.cosine_loss(z, y, reduction="mean"),
            "forward_backward": lambda: rk.cosine_loss(z, y, reduction="mean").backward(),
            "kernel": lambda: ops.cosine_loss_fwd(z.detach(), y, 1e-8, True),
            "eager": lambda: (1 - F.cosine_similarity(z, y, dim=1, eps=1e-8)).mean(),
            "eager_backward": lambda: (
                (1 - F.cosine_similarity(z, y, dim=1, eps=1e-8)).mean().backward()
            ),
        },
        "select_topk": {
            "forward": lambda: rk.select_topk(scores, k),
            "kernel": lambda: ops.select_topk(scores, k, True),
            "eager": lambda: torch.sort(torch.topk(scores, k, sorted=False).indices).values,
        },
        "score_and_select": {
            "forward": lambda: rk.score_and_select(z.detach(), p, t, k),
            "kernel": lambda: ops.score_and_select(
                z.detach(), p, t.mean, t.matrix, t.bias, 1e-8, k, True
            ),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dp", type=int, default=16)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200, help="back-to-back calls per sample")
    parser.add_argument("--rounds", type=int, default=31, help="samples per function")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if not rk.backends.available()["cpu"].usable:
        print("bench_call_overhead: needs the C++ extension (make build)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    env = environment("cpu")
    print(f"# {env['device']} | torch {env['torch']} | {env['git_sha'][:12]}")
    print(f"{'op':<24} {'call':<17} {'us/call':>8} {'kernel':>8} {'host':>8} {'eager':>8}")
    for op, fns in cases(args.batch, args.dp, args.d).items():
        seconds = interleaved_median_times(
            fns, warmup=args.calls, repeat=args.rounds, calls=args.calls
        )
        us = {name: value * 1e6 for name, value in seconds.items()}
        for call in ("forward", "forward_backward"):
            if call not in us:
                continue
            # The kernel is the whole forward's floor; a backward has no bare kernel to compare.
            host = us[call] - us["kernel"] if call == "forward" else None
            eager = us.get("eager" if call == "forward" else "eager_backward")
            cells = [f"{us[call]:8.1f}", f"{us['kernel']:8.1f}"]
            cells += [
                "" if host is None else f"{host:8.1f}",
                "" if eager is None else f"{eager:8.1f}",
            ]
            print(f"{op:<24} {call:<17} " + " ".join(f"{cell:>8}" for cell in cells))
            append_result(
                args.out,
                {
                    "benchmark": "call_overhead",
                    "op": op,
                    "call": call,
                    "backend": "cpu",
                    "shape": {"batch": args.batch, "dp": args.dp, "d": args.d},
                    "us_per_call": round(us[call], 2),
                    "kernel_us": round(us["kernel"], 2),
                    "host_us": None if host is None else round(host, 2),
                    "eager_us": None if eager is None else round(eager, 2),
                    "calls": args.calls,
                    "rounds": args.rounds,
                    **env,
                },
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
