"""Images/s of a prior's forward pass, the work `rela-train embed` does per batch once the images
are decoded (ResNet-50 at 224 px by default; on CUDA in channels_last under bf16 autocast, as the
prior runs there). Results: benchmarks/results/embed.jsonl.

    python benchmarks/bench_embed.py --device cuda
    python benchmarks/bench_embed.py --quick          # tiny CPU smoke run, nothing saved
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, environment, median_time  # noqa: E402
from rela_train.prior.loaders import load_prior  # noqa: E402
from rela_train.runtime import resolve_device  # noqa: E402


def bench(prior_spec: str, size: int, batch: int, device: torch.device, repeat: int) -> dict:
    prior = load_prior(prior_spec, device=device, input_size=size)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    seconds = median_time(lambda: prior.encode(images), warmup=2, repeat=repeat, device=device)
    return {
        "benchmark": "embed",
        "prior": prior_spec,
        "input_size": size,
        "batch_size": batch,
        "dim": prior.dim,
        "batch_ms": seconds * 1e3,
        "images_per_s": batch / seconds,
        "timing": "do_bench median" if device.type == "cuda" else f"median of {repeat}",
        **environment(device),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prior", default="random:resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny model and images, no save")
    parser.add_argument("--out", default="embed.jsonl", help="file under benchmarks/results/")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.quick:
        args.prior, args.input_size, args.batch_size, args.repeat = "random:resnet10", 32, 8, 2
        args.no_save = True
    record = bench(args.prior, args.input_size, args.batch_size, device, args.repeat)
    print(
        f"embed {record['prior']} {record['input_size']} px batch {record['batch_size']} on "
        f"{record['device']}: {record['batch_ms']:.2f} ms/batch, {record['images_per_s']:.0f} img/s"
    )
    if not args.no_save:
        append_result(args.out, record)


if __name__ == "__main__":
    main()
