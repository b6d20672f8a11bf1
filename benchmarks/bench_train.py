"""Images/s of the trainer's whole optimizer step (BYOL, ReLA phase, BYOL after a ReLA phase).

One step is everything ``Trainer`` does per optimizer step: the augmentation on the device,
forward and backward of both views, the loss, the optimizer, the target EMA, the score table.

* ``--data device``: synthetic uint8 batches already on the device, no loader; each variant's
  ``Trainer.step`` is timed step by step, the variants round-robin so that drifting
  machine load hits all of them alike (median seconds per step). ``--device-input views``
  (default) hands the engine loader-cut views ``[B, 2, 3, S, S]`` (what the folder pipeline
  gives it: only the photometric half runs on the device); ``images`` hands it whole images
  ``[B, 3, L, L]`` at the load size (the device crops too).
* ``--data folder``: the real input pipeline. A folder of ImageNet-sized JPEGs is generated once
  (cached, or ``--folder PATH``) and ``Trainer.run()`` runs on it until warmup + N steps; the rate
  is images per step x N / the time between the end of the last warmup step and the end of the
  last step, so it includes waiting for data. The loader alone (``train_source.batches`` with the
  epoch's crop plan, no training) is timed too, to show which of the two limits the rate. Folder
  runs add the batches the loader prefetches (prefetch x workers) to the warmup so that the timed
  steps do not just drain the buffer filled during the first, slow step.

Variants: ``byol`` (no prior), ``rela`` (ReLA phase: ``--prior``, switch ``never``),
``rela-byol`` (a ReLA run after its switch: ``const:0``), each with ``--compile off|on|both``
(``compile=True`` compiles the backbones). The ReLA-phase target: <= 3% over the BYOL step.

On CUDA the default is the preset's job (``imagenet-r50-byol``: ResNet-50, 224 px, batch 256 on
one rank, bf16 autocast and channels_last from the trainer defaults); on CPU the model shrinks to
a few-minute run unless --arch/--width/--image-size/--batch-size say otherwise. One JSON line per
(data, variant, compile) goes to ``benchmarks/results/train.jsonl`` (``--results``).

    .venv/bin/python benchmarks/bench_train.py --data device --compile both --threads 2
    .venv/bin/python benchmarks/bench_train.py --data folder --workers 2 --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, environment  # noqa: E402
from rela_train.config import TrainConfig  # noqa: E402
from rela_train.data.jpeg_folder import make_jpeg_folder  # noqa: E402
from rela_train.data.sources import Batch  # noqa: E402
from rela_train.engine import Hooks, Trainer  # noqa: E402
from rela_train.presets import get_preset  # noqa: E402
from rela_train.runtime import resolve_device  # noqa: E402

RESULTS_FILE = "train.jsonl"
# The switch rule of each variant (its prior: --prior, except byol).
VARIANTS = {"byol": "adaptive", "rela": "never", "rela-byol": "const:0"}
# CPU defaults where the preset's job would take hours; --arch etc. still win.
CPU_SHRINK = {"arch": "resnet18", "width": 16, "image_size": 64, "batch_size": 32}
CPU_HEADS = {"proj_hidden": 1024, "proj_dim": 128, "rela_dim": 64}
_MARK = ".rela-bench-train"  # in a generated folder: "generating", then "complete N LO HI"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def base_config(args: argparse.Namespace, device: torch.device) -> tuple[TrainConfig, str]:
    """The preset adapted to one rank and this device; and a line saying what was shrunk."""
    config = get_preset(args.preset)
    changes: dict = {}
    shrunk = []
    for name in ("arch", "width", "image_size", "batch_size"):
        value = getattr(args, name)
        if value is None and device.type == "cpu":
            value = CPU_SHRINK[name]
            shrunk.append(f"{name}={value}")
        if value is not None:
            changes[name] = value
    if device.type == "cpu":
        changes.update(CPU_HEADS)
        shrunk += [f"{k}={v}" for k, v in CPU_HEADS.items()]
    image_size = changes.get("image_size", config.image_size)
    if image_size != config.image_size:
        changes["load_size"] = None  # the trainer's 8/7 rule
    changes.update(
        dataset="synthetic",  # a placeholder: each mode sets its data
        device=str(device),
        threads=args.threads,
        progress=False,
        epochs=1,
        eval_every=0,
        probe_epochs=0,
        eval_bank=None,
        global_batch=None,
        accum_steps=1,
        budget=1.0,
        policy="random",
    )
    if args.workers is not None:
        changes["workers"] = args.workers
    note = f"CPU run: shrunk {args.preset} to {', '.join(shrunk)}" if shrunk else ""
    return config.replace(**changes), note


def load_size(config: TrainConfig) -> int:
    return config.load_size or max(config.image_size, round(config.image_size * 8 / 7))


def variant_config(
    base: TrainConfig, variant: str, compiled: bool, prior: str, priors: dict[str, Path]
) -> TrainConfig:
    """``base`` for one variant; a prior already embedded for this data is reused (its store)."""
    changes: dict = {"switch": VARIANTS[variant], "compile": compiled}
    changes.update(prior=None, prior_store=None)
    if variant != "byol":
        store = priors.get(base.dataset)
        if store is not None:
            changes["prior_store"] = str(store)
        else:
            changes["prior"] = prior
    return base.replace(**changes)


def build_trainer(
    config: TrainConfig, run_dir: Path, priors: dict[str, Path], hooks: Hooks | None = None
) -> Trainer:
    trainer = Trainer(config, run_dir, hooks=hooks, log=lambda _: None)
    if config.prior is not None:
        priors[config.dataset] = run_dir / "prior"  # embeddings + transport, for later variants
    return trainer


@dataclass
class Case:
    """One (data, variant, compile) measurement."""

    data: str
    variant: str
    compiled: bool
    step_times: list[float] = field(default_factory=list)  # seconds of each timed step
    first_step_s: float = math.nan  # the first step (compilation, worker start-up)
    images_per_step: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def seconds_per_step(self) -> float:
        if "seconds_per_step" in self.extra:
            return self.extra["seconds_per_step"]
        return statistics.median(self.step_times)

    @property
    def images_per_s(self) -> float:
        return self.images_per_step / self.seconds_per_step


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Device data
# ----------------------------------------------------------------------------------------------


def device_batch(trainer: Trainer, kind: str) -> Batch:
    """A fixed batch of random uint8 pixels on the device (views or whole images)."""
    config, device = trainer.config, trainer.device
    size = config.batch_size
    g = torch.Generator().manual_seed(0)
    indices = torch.arange(size, dtype=torch.int64)
    if kind == "views":
        count = len(trainer.augment[trainer.phase].views)
        shape = (size, count, trainer.train_source.channels, config.image_size, config.image_size)
        views = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
        return Batch(images=None, indices=indices, views=views)
    side = load_size(config)
    shape = (size, trainer.train_source.channels, side, side)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
    return Batch(images=images, indices=indices)


def run_device(args, base: TrainConfig, work: Path, priors: dict[str, Path]) -> list[Case]:
    # Synthetic in-memory training set: only its size matters (labels, prior rows, score table).
    rows = max(2 * base.batch_size, 2 * base.rela_dim)
    base = base.replace(
        dataset="synthetic", data_dir=None, val_dir=None, train_subset=rows, val_subset=16
    )
    steps = []
    cases = []
    for compiled in args.compile_flags:
        for variant in args.variants:
            config = variant_config(base, variant, compiled, args.prior, priors)
            run_dir = work / f"device-{variant}-{'compiled' if compiled else 'eager'}"
            trainer = build_trainer(config, run_dir, priors)
            trainer.sampler.set_epoch(0)
            batch = device_batch(trainer, args.device_input)
            case = Case("device", variant, compiled, images_per_step=config.batch_size)
            case.extra["input"] = args.device_input
            cases.append(case)
            steps.append(lambda trainer=trainer, batch=batch: trainer.step([batch]))
    device = resolve_device(base.device)
    for case, step in zip(cases, steps, strict=True):
        case.first_step_s = _timed(step, device)
        for _ in range(args.warmup - 1):
            step()
    for _ in range(args.steps):  # round-robin: slow drifts of the machine hit every variant
        for case, step in zip(cases, steps, strict=True):
            case.step_times.append(_timed(step, device))
    return cases


# ----------------------------------------------------------------------------------------------
# Folder data
# ----------------------------------------------------------------------------------------------


def _make_part(root: str, count: int, size_range: tuple[int, int], seed: int) -> None:
    make_jpeg_folder(root, classes=1, per_class=count, size_range=size_range, seed=seed)


def jpeg_folder(path: Path, images: int, size_range: tuple[int, int]) -> tuple[Path, Path]:
    """``(path/train, path/val)``: at least ``images`` JPEGs in 10 classes, and 8 to evaluate on,
    generated in parallel the first time; reused while the marker says they hold enough images
    of these sizes. Only a folder this function made (marked) is ever rewritten."""
    train, val = path / "train", path / "val"
    mark = path / _MARK
    lo, hi = size_range
    if mark.is_file():
        state, *fields = mark.read_text().split()
        if state == "complete" and int(fields[0]) >= images and fields[1:] == [str(lo), str(hi)]:
            return train, val
    elif path.exists() and any(path.iterdir()):
        raise SystemExit(f"--folder {path}: not empty and not a folder made by this benchmark")
    path.mkdir(parents=True, exist_ok=True)
    mark.write_text("generating\n")
    shutil.rmtree(train, ignore_errors=True)
    shutil.rmtree(val, ignore_errors=True)
    parts = 10
    per_part = -(-images // parts)
    print(f"writing {parts * per_part} JPEGs ({lo}-{hi} px) to {train}", flush=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = [
            pool.submit(_make_part, str(train / f"part_{k:02d}"), per_part, size_range, k)
            for k in range(parts)
        ]
        for job in jobs:
            job.result()
    make_jpeg_folder(val, classes=2, per_class=4, size_range=size_range, seed=1000)
    mark.write_text(f"complete {parts * per_part} {lo} {hi}\n")
    return train, val


def _rate(stamps: list[float], rows: list[int], warmup: int) -> tuple[float, float, int]:
    """``(images/s, seconds per step, images)`` between stamp ``warmup - 1`` and the last."""
    images = sum(rows[warmup:])
    elapsed = stamps[-1] - stamps[warmup - 1]
    return images / elapsed, elapsed / (len(stamps) - warmup), images


def measure_loader(trainer: Trainer, steps: int, warmup: int) -> dict:
    """The loader alone over the epoch's first batches (this phase's crop plan, no training)."""
    trainer.sampler.set_epoch(0)
    flat = [b for group in trainer.pending_steps() for b in group][: warmup + steps]
    start = time.perf_counter()
    stamps, rows = [], []
    for batch in trainer.train_source.batches(flat, trainer.crop_plan()):
        stamps.append(time.perf_counter())
        rows.append(int(batch.indices.shape[0]))
    rate, seconds, _ = _rate(stamps, rows, warmup)
    return {"images_per_s": rate, "seconds_per_batch": seconds, "first_batch_s": stamps[0] - start}


def run_folder(args, base: TrainConfig, work: Path, priors: dict[str, Path]) -> list[Case]:
    workers = base.workers
    warmup = args.warmup + base.prefetch * workers
    images = (warmup + args.steps + 2) * base.batch_size
    lo, hi = args.size_range
    path = args.folder or Path(tempfile.gettempdir()) / f"rela_bench_train_jpegs_{lo}-{hi}"
    train, val = jpeg_folder(path, images, (lo, hi))
    base = base.replace(
        dataset="folder", data_dir=str(train), val_dir=str(val), train_subset=None, val_subset=None
    )
    loaders: dict[str, dict] = {}  # the loader alone, per phase (the crops differ)
    cases = []
    for compiled in args.compile_flags:
        for variant in args.variants:
            config = variant_config(base, variant, compiled, args.prior, priors)
            case = Case("folder", variant, compiled, images_per_step=config.batch_size)
            stamps: list[float] = []
            rows: list[int] = []

            def on_step_end(trainer: Trainer, stamps=stamps, rows=rows) -> None:
                stamps.append(time.perf_counter())
                rows.append(trainer.config.batch_size)
                if len(stamps) >= warmup + args.steps:
                    trainer.request_stop()

            run_dir = work / f"folder-{variant}-{'compiled' if compiled else 'eager'}"
            trainer = build_trainer(config, run_dir, priors, Hooks(on_step_end=on_step_end))
            if trainer.phase not in loaders:
                loaders[trainer.phase] = measure_loader(trainer, args.steps, warmup)
                loader = Case("loader", trainer.phase, False, images_per_step=config.batch_size)
                seconds = loaders[trainer.phase]["seconds_per_batch"]
                loader.extra.update(seconds_per_step=seconds, workers=workers)
                loader.first_step_s = loaders[trainer.phase]["first_batch_s"]
                cases.append(loader)
            start = time.perf_counter()
            result = trainer.run()
            if result.status != "interrupted" or len(stamps) < warmup + args.steps:
                raise RuntimeError(f"folder run {variant}: the epoch ended before the timed steps")
            rate, seconds, _ = _rate(stamps, rows, warmup)
            half = warmup + args.steps // 2
            case.first_step_s = stamps[0] - start
            case.step_times = [b - a for a, b in itertools.pairwise(stamps[warmup - 1 :])]
            case.extra.update(
                seconds_per_step=seconds,
                workers=workers,
                warmup_steps=warmup,
                images_per_s_second_half=_rate(stamps, rows, half)[0],
                loader_images_per_s=loaders[trainer.phase]["images_per_s"],
                folder_images=trainer.train_source.n,
                size_range=[lo, hi],
            )
            cases.append(case)
    return cases


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _byol_seconds(cases: list[Case], case: Case) -> float | None:
    for other in cases:
        if (other.data, other.compiled, other.variant) == (case.data, case.compiled, "byol"):
            return other.seconds_per_step
    return None


def report(cases: list[Case], args, base: TrainConfig, load_start: float) -> None:
    print(
        f"\n{args.preset}: {base.arch} width {base.width}, {base.image_size} px (load "
        f"{load_size(base)}), batch {base.batch_size}, device {base.device}, "
        f"{torch.get_num_threads()} threads; load average at start {load_start:.2f}, "
        f"now {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'data':7s} {'variant':10s} {'compile':7s} {'input':9s} {'images/s':>16s} "
        f"{'ms/step':>9s} {'vs byol':>8s} {'first step':>11s}"
    )
    env = environment(base.device)
    for case in cases:
        byol = _byol_seconds(cases, case)
        ratio = case.seconds_per_step / byol if byol and case.data != "loader" else None
        source = case.extra.get("input") or f"{case.extra.get('workers')} workers"
        print(
            f"{case.data:7s} {case.variant:10s} {('on' if case.compiled else 'off'):7s} "
            f"{source:9s} {case.images_per_s:10.1f} img/s {1e3 * case.seconds_per_step:9.2f} "
            f"{'' if ratio is None else f'x{ratio:.3f}':>8s} {case.first_step_s:10.2f}s"
        )
        if args.no_save:
            continue
        record = {
            "benchmark": "train",
            "data": case.data,
            "variant": case.variant,
            "compile": case.compiled,
            "preset": args.preset,
            "arch": base.arch,
            "width": base.width,
            "image_size": base.image_size,
            "load_size": load_size(base),
            "batch_size": base.batch_size,
            "prior": None if case.variant == "byol" else args.prior,
            "steps": args.steps,
            "threads": torch.get_num_threads(),
            "images_per_s": case.images_per_s,
            "seconds_per_step": case.seconds_per_step,
            "step_seconds_min": min(case.step_times, default=None),
            "step_seconds_max": max(case.step_times, default=None),
            "first_step_s": case.first_step_s,
            "ratio_to_byol": ratio,
            "load_average_1min_start": round(load_start, 2),
            **case.extra,
            **env,
        }
        append_result(args.results, record)
    rela = [c for c in cases if c.variant == "rela" and c.data != "loader"]
    for case in rela:
        byol = _byol_seconds(cases, case)
        if byol:
            over = 100 * (case.seconds_per_step / byol - 1)
            compiled = "compiled" if case.compiled else "eager"
            print(f"ReLA-phase step vs BYOL step ({case.data}, {compiled}): {over:+.1f}%")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("device", "folder", "both"), default="device")
    parser.add_argument("--device-input", choices=("views", "images"), default="views")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off")
    parser.add_argument("--preset", default="imagenet-r50-byol")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch")
    parser.add_argument("--width", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--prior", default="pixels:16", help="prior of the ReLA variants")
    parser.add_argument("--steps", type=int, help="timed steps (default 20 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3 / 10)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--workers", type=int, help="folder: decoding processes (preset's)")
    parser.add_argument("--folder", type=Path, help="folder: where the JPEGs are cached")
    parser.add_argument("--size-range", type=int, nargs=2, default=(300, 500), metavar=("LO", "HI"))
    parser.add_argument("--results", default=RESULTS_FILE, help="JSON lines file to append to")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    args.compile_flags = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cpu = device.type == "cpu"
    args.steps = args.steps or (20 if cpu else 50)
    args.warmup = max(1, args.warmup if args.warmup is not None else (3 if cpu else 10))
    base, note = base_config(args, device)
    if note:
        print(note)
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    priors: dict[str, Path] = {}
    try:
        cases = []
        if args.data in ("device", "both"):
            cases += run_device(args, base, work, priors)
        if args.data in ("folder", "both"):
            cases += run_folder(args, base, work, priors)
        report(cases, args, base, load_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
