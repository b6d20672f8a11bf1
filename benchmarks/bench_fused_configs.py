"""Every candidate configuration of the fused loss timed on its own, next to the traffic model.

For the loss, the loss with gradient and the histogram variant of one shape: the configurations
the autotuner may pick on this GPU (``fused_loss_launch(...).candidates()``), each launched
directly and timed (median), the traffic model's prediction for it
(``benchmarks/traffic_model.py``), and which one the autotuner chose. ``make gpu-check`` runs it
after the loss benchmark, whose autotuning has already compiled these kernels.

On a CPU machine it runs only under the Triton interpreter (``TRITON_INTERPRET=1``), on every
tile of the list at a small shape: that checks the records, not speed.

    python benchmarks/bench_fused_configs.py --device cuda --out build/gpu-check/bench.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import append_result, environment, median_time  # noqa: E402
from benchmarks.traffic_model import fused_loss_traffic  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("loss", "grad", "hist")


def _arch(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def launch_with(launch, config):
    return lambda: launch.run(config)


def bench(b: int, dp: int, d: int, dtype: torch.dtype, device: torch.device, repeat: int) -> list:
    from rela_kernels.triton import cosine_loss as kernels
    from rela_kernels.triton import resource_table

    g = torch.Generator(device="cpu").manual_seed(0)
    p = torch.randn(b, dp, generator=g).to(device=device, dtype=dtype)
    z = torch.randn(b, d, generator=g).to(device=device, dtype=dtype)
    mean = torch.randn(dp, generator=g).to(device)
    matrix = (torch.randn(dp, d, generator=g) / dp**0.5).to(device)
    arch = _arch(device)
    env = environment(device)
    shape = {"B": b, "Dp": dp, "d": d, "dtype": str(dtype).replace("torch.", "")}
    records = []
    for mode in MODES:
        loss = torch.empty(b, dtype=torch.float32, device=device)
        grad = torch.empty_like(z)
        hist = torch.zeros(2**kernels.HIST_BITS, dtype=torch.int32, device=device)
        # The histogram keeps counting across the timed runs: the same atomics, never read.
        histogram = (hist, True, kernels.HIST_BITS) if mode == "hist" else None
        launch = kernels.fused_loss_launch(
            z, p, mean, matrix, None, 1e-8, mode == "grad", histogram, loss, grad, arch
        )
        if arch is None:  # the interpreter: every tile; its fixed tile stands for the pick
            candidates = kernels.fused_configs()
            tile = launch.fixed.kwargs
            chosen = next((c for c in candidates if c.kwargs == tile), launch.fixed)
        else:
            candidates = launch.candidates()
            launch.run()  # autotunes (the compiles are cached by then)
            chosen = launch.tuner.best_config
        meta = launch.meta
        for config in candidates:
            seconds = median_time(launch_with(launch, config), repeat=repeat, device=device)
            model = fused_loss_traffic(
                batch=b,
                dp=dp,
                d=d,
                p_bytes=p.element_size(),
                z_bytes=z.element_size(),
                dot=resource_table.dot_kind(meta["LOWP_DOT"], meta["INPUT_PRECISION"]),
                block_b=config.kwargs["BLOCK_B"],
                block_d=meta["BLOCK_D"],
                single_tile=meta["SINGLE_TILE"],
                grad=meta["COMPUTE_GRAD"],
            )
            key = resource_table.config_key(config)
            records.append(
                {
                    "benchmark": "fused_config",
                    "mode": mode,
                    "config": key,
                    "chosen": key == resource_table.config_key(chosen),
                    **shape,
                    "measured_ms": seconds * 1e3,
                    "predicted_ms": model.predicted_ms,
                    "predicted_bound": model.bound,
                    "l2_over_hbm": model.l2_over_hbm,
                    "measured_over_predicted": seconds * 1e3 / model.predicted_ms,
                    "model": "benchmarks/traffic_model.py, H200 rates (predictions)",
                    **env,
                }
            )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("B", "DP", "D"))
    parser.add_argument("--repeat", type=int, default=10, help="CPU repeats (GPU: do_bench)")
    parser.add_argument("--out", default="fused_configs.jsonl", help="JSONL (relative: results/)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from rela_kernels.triton import cosine_loss as kernels

    if device.type != "cuda" and not kernels.is_interpreted():
        print("bench_fused_configs: needs a CUDA device or TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    b, dp, d = args.shape or ((65536, 768, 256) if device.type == "cuda" else (64, 48, 24))
    print(f"{'mode':<6}{'config':<16}{'measured ms':>12}{'predicted ms':>13}{'ratio':>7}  chosen")
    for record in bench(b, dp, d, DTYPES[args.dtype], device, args.repeat):
        append_result(args.out, record)
        print(
            f"{record['mode']:<6}{record['config']:<16}{record['measured_ms']:>12.4f}"
            f"{record['predicted_ms']:>13.4f}{record['measured_over_predicted']:>7.2f}  "
            f"{'*' if record['chosen'] else ''}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
