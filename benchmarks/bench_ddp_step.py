"""One optimizer step of the trainer on two gloo ranks (CPU): the data-parallel wrappers compared.

* ``phase``: what the trainer uses, one DDP wrapper per kind of step over the parameters that
  step trains (``rela_train.parallel.PhaseParallel``);
* ``whole``: one DDP wrapper over the whole learner with ``find_unused_parameters=True`` (each
  phase leaves some heads out, so DDP searches the autograd graph for them every step).

Both are timed in the same processes on the same model and batch, round-robin, for a BYOL-phase
and a ReLA-phase step. Results are appended to ``benchmarks/results/ddp_step.jsonl`` with the CPU
model and the 1-minute load average.

    .venv/bin/python benchmarks/bench_ddp_step.py [--width 16] [--batch-size 64] [--repeat 20]

The script starts its two ranks itself (``torch.distributed.run --standalone``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, environment  # noqa: E402
from rela_train.data.sources import Batch  # noqa: E402
from rela_train.engine import Trainer  # noqa: E402
from rela_train.parallel import PhaseParallel  # noqa: E402
from rela_train.presets import get_preset  # noqa: E402


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-save", action="store_true")
    return parser.parse_args()


def _launch() -> int:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", __file__, *sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, check=False).returncode


def _rank(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="bench_ddp_step_"))
    try:
        config = get_preset("synthetic-test").replace(
            width=args.width,
            image_size=args.image_size,
            batch_size=args.batch_size,
            train_subset=args.batch_size * 8,
            prior="pixels:16",
            eval_every=0,
            threads=1,
            dist_timeout=120.0,
        )
        # Rank 0 names the directory; the run directory must be the same on both ranks.
        name = [str(directory)]
        dist.init_process_group("gloo")
        dist.broadcast_object_list(name, src=0)
        trainer = Trainer(config, Path(name[0]) / "run", log=lambda _: None)
        trainer.sampler.set_epoch(0)
        phase_parallel = trainer.objective
        assert isinstance(phase_parallel, PhaseParallel)
        whole = nn.parallel.DistributedDataParallel(
            phase_parallel.objective, find_unused_parameters=True
        )
        indices = torch.arange(args.batch_size) + dist.get_rank() * args.batch_size
        images = trainer.train_source.images[indices]
        variants = {"phase": phase_parallel, "whole": whole}

        def step(variant: str, phase: str) -> float:
            trainer.objective = variants[variant]
            trainer.switch.switched = phase == "byol"
            dist.barrier()
            start = time.perf_counter()
            trainer.step([Batch(images, indices)])
            return time.perf_counter() - start

        cases = [(v, p) for p in ("byol", "rela") for v in variants]
        for case in cases:  # warm every variant before timing any
            for _ in range(3):
                step(*case)
        times: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
        for _ in range(args.repeat):
            for case in cases:
                times[case].append(step(*case))
        if dist.get_rank() == 0:
            _report(args, times)
        # Every reducer goes before the process group (PhaseParallel.close says why).
        trainer.objective = phase_parallel
        variants.clear()
        del whole
        phase_parallel.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(directory, ignore_errors=True)


def _report(args: argparse.Namespace, times: dict[tuple[str, str], list[float]]) -> None:
    median = {case: sorted(values)[len(values) // 2] for case, values in times.items()}
    env = environment("cpu")
    load = env.get("load_average_1min", os.getloadavg()[0])
    for (variant, phase), seconds in median.items():
        record = {
            "benchmark": "ddp_step",
            "variant": variant,
            "phase": phase,
            "ranks": 2,
            "backend": "gloo",
            "width": args.width,
            "image_size": args.image_size,
            "batch_size_per_rank": args.batch_size,
            "repeat": args.repeat,
            "seconds": seconds,
            "ratio_to_whole": seconds / median[("whole", phase)],
            **env,
        }
        if not args.no_save:
            append_result("ddp_step.jsonl", record)
        print(
            f"{phase:5s} {variant:6s} {1e3 * seconds:8.1f} ms/step  "
            f"x{seconds / median[('whole', phase)]:.3f} of whole-learner DDP"
        )
    print(f"load average (1 min): {load:.2f}")


if __name__ == "__main__":
    arguments = _parse()
    if "RANK" in os.environ:
        _rank(arguments)
    else:
        sys.exit(_launch())
