"""Two-view decoding: our loader against the standard torchvision-style pipeline, one process.

Both cut the same two RandomResizedCrop views (boxes and flips from the same
:class:`~rela_train.data.views.CropPlan`) of each image at ``--size`` px, as uint8 tensors, and
stack the set into one batch as the loader's collate does:

* ``standard``: what a torchvision ``ImageFolder`` + ``RandomResizedCrop`` + flip pipeline does,
  written with Pillow and torch only: decode the whole JPEG, convert to RGB, then per view crop
  the box, resize it (bilinear, Pillow's antialiasing), mirror it, make it a tensor.
* ``ours-pil``: :func:`~rela_train.data.views.decode_views` with Pillow: the JPEG decodes at the
  largest DCT downscale (draft mode) that keeps both boxes at least ``size`` px, each box resized
  straight from the decoded image.
* ``ours-simplejpeg``: the same with libjpeg-turbo through simplejpeg (when installed).

The images are generated JPEGs in two sets: ImageNet's typical sizes (sides of 333-500 px, about
60-110 kB) and large photos (1,000 px on the long side). Each figure is images per second of one
process (two views per image) per second of its CPU time (the wall-time rate is recorded too:
on a shared machine it also counts the waits for a core), the median of ``--repeat`` passes over
the set with the variants interleaved, and the number of CPU cores one GPU needs to be fed at
``--target`` images/s: the GPU check's ResNet-50 BYOL target (``benchmarks/gpu_check.py``: BYOL
>= 2000 img/s at 224 px).

    python benchmarks/bench_loader.py              # records to benchmarks/results/loader.jsonl
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, environment  # noqa: E402
from rela_train.data.augment import byol_views  # noqa: E402
from rela_train.data.jpeg_folder import structured_image  # noqa: E402
from rela_train.data.views import CropPlan, decode_views, simplejpeg  # noqa: E402

# The GPU check's ResNet-50 BYOL target (benchmarks/gpu_check.py, bench_table): images/s.
GPU_TARGET_IMAGES_PER_S = 2000.0
# ImageNet-like shapes (width, height): its median image is about 500 x 375.
IMAGENET_SHAPES = ((500, 375), (375, 500), (500, 333), (400, 400), (500, 400), (333, 500))
LARGE_SHAPES = ((1000, 750), (750, 1000), (1000, 667))


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """The test folders' smooth structured image plus fine texture, so that it compresses like a
    photograph (the smooth image alone makes JPEGs several times smaller than ImageNet's)."""
    base = structured_image(rng, width, height).astype(np.float32)
    texture = rng.normal(0, 9, size=(height, width, 1)) + rng.normal(0, 4, size=(height, width, 3))
    return Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))


def make_images(directory: Path, shapes, count: int, quality: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = shapes[i % len(shapes)]
        buffer = io.BytesIO()
        photo_like(rng, width, height).save(buffer, format="JPEG", quality=quality)
        path = directory / f"{i:04d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def standard_views(path: Path, plan: CropPlan, index: int) -> torch.Tensor:
    """The torchvision-style pipeline (full decode, crop, resize, flip) on ``plan``'s boxes."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")  # decodes the whole image
    boxes, flips = plan.draw(index, rgb.height, rgb.width)
    views = []
    for (left, top, w, h), flip in zip(boxes.tolist(), flips.tolist(), strict=True):
        view = rgb.crop((int(left), int(top), int(left + w), int(top + h)))
        view = view.resize((plan.size, plan.size), Image.Resampling.BILINEAR)
        if flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(torch.from_numpy(np.array(view)).permute(2, 0, 1))  # a copy, as PILToTensor
    return torch.stack(views)


def interleaved_times(
    fns: dict[str, Callable[[], object]], warmup: int, repeat: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU seconds of each function, timed round-robin. The CPU time of this
    one-threaded process is what the work costs a core of its own; on a machine shared with
    other jobs the wall time also holds the time it waited for one."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return (
        {name: statistics.median(values) for name, values in wall.items()},
        {name: statistics.median(values) for name, values in cpu.items()},
    )


def variants(size: int) -> dict[str, Callable[[Path, CropPlan, int], torch.Tensor]]:
    out = {
        "standard": standard_views,
        "ours-pil": lambda p, plan, i: decode_views(p, plan, i, decoder="pil"),
    }
    if simplejpeg is not None:
        out["ours-simplejpeg"] = lambda p, plan, i: decode_views(p, plan, i, decoder="simplejpeg")
    return out


def bench_set(
    name: str, paths: list[Path], size: int, repeat: int, warmup: int, target: float
) -> list[dict]:
    plan = CropPlan(byol_views(True), size, seed=0, epoch=0)
    # Each pass ends with the batch the loader's collate builds (one torch.stack of every
    # sample's views), so a layout copy saved in one variant is not just moved out of the timing.
    fns = {
        variant: (lambda fn=fn: torch.stack([fn(p, plan, i) for i, p in enumerate(paths)]))
        for variant, fn in variants(size).items()
    }
    seconds, cpu_seconds = interleaved_times(fns, warmup=warmup, repeat=repeat)
    kilobytes = [p.stat().st_size / 1e3 for p in paths]
    sides = [max(Image.open(p).size) for p in paths]
    env = environment("cpu")
    records = []
    for variant, s in seconds.items():
        # Cores are counted from CPU time: what one dedicated core decodes, whatever else runs.
        rate = len(paths) / cpu_seconds[variant]
        records.append(
            {
                "benchmark": "loader",
                "set": name,
                "variant": variant,
                "images": len(paths),
                "views": 2,
                "size": size,
                "jpeg_kb_min": round(min(kilobytes), 1),
                "jpeg_kb_max": round(max(kilobytes), 1),
                "long_side_min": min(sides),
                "long_side_max": max(sides),
                "images_per_s": rate,
                "images_per_s_wall": len(paths) / s,
                "speedup_vs_standard": cpu_seconds["standard"] / cpu_seconds[variant],
                "target_images_per_s": target,
                "cores_for_target": math.ceil(target / rate),
                "process_threads": torch.get_num_threads(),
                **env,
            }
        )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images per set (48)")
    parser.add_argument("--size", type=int, default=224, help="view side in pixels (224)")
    parser.add_argument("--repeat", type=int, default=7, help="timed passes per variant (7)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--target", type=float, default=GPU_TARGET_IMAGES_PER_S)
    parser.add_argument("--sets", default="imagenet,large", help="imagenet,large")
    parser.add_argument("--out", default="loader.jsonl", help="JSONL (relative: results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one loader process: one core
    sets = {"imagenet": (IMAGENET_SHAPES, 92), "large": (LARGE_SHAPES, 90)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            shapes, quality = sets[name]
            directory = Path(tmp) / name
            directory.mkdir()
            paths = make_images(directory, shapes, args.images, quality, seed=len(name))
            for record in bench_set(name, paths, args.size, args.repeat, args.warmup, args.target):
                append_result(args.out, record)
                print(
                    f"{name:8s} {record['variant']:16s} {record['images_per_s']:7.1f} img/s "
                    f"({record['images_per_s_wall']:.1f} wall) "
                    f"(x{record['speedup_vs_standard']:.2f}) -> {record['cores_for_target']} "
                    f"cores for {args.target:.0f} img/s; JPEGs {record['jpeg_kb_min']}-"
                    f"{record['jpeg_kb_max']} kB, load {record['load_average_1min']}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
