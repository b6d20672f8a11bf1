"""Per-step cost of ReLA over plain BYOL in the reference trainer (one optimizer step).

Measures, on the same model, batch and device:

* ``byol``: a BYOL-phase step (two views through online backbone + heads and the target);
* ``rela_byol``: a BYOL-phase step of a ReLA run (after the switch; it carries the ReLA head);
* ``rela``: a ReLA-phase step (two views through backbone + linear head, fused transported
  cosine loss on the batch's prior embeddings; no target network, no projector/predictor);
* ``rela_work``: what ReLA adds to a step, alone: gathering the batch's prior rows, the fused
  transported cosine loss of both views forward and backward, the score-table update.

The target: ReLA's per-step overhead, ``rela_work`` / ``byol``, <= 3%. Results are appended to
``benchmarks/results/train_step.jsonl``.

    .venv/bin/python benchmarks/bench_train_step.py [--device cpu] [--threads 2] [--repeat 15]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, environment, median_time  # noqa: E402
from rela_train.data.sources import Batch  # noqa: E402
from rela_train.engine import Trainer  # noqa: E402
from rela_train.presets import get_preset  # noqa: E402
from rela_train.rela import rela_loss  # noqa: E402


def _trainer(directory: Path, rela: bool, args: argparse.Namespace) -> Trainer:
    config = get_preset(args.preset).replace(
        device=args.device,
        threads=args.threads,
        progress=False,
        eval_every=0,
        train_subset=max(args.batch_size * 4, 512),
        batch_size=args.batch_size,
        prior="pixels:16" if rela else None,
    )
    trainer = Trainer(config, directory / ("rela" if rela else "byol"), log=lambda _: None)
    trainer.sampler.set_epoch(0)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="fashion-mnist-demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    try:
        byol = _trainer(directory, False, args)
        rela = _trainer(directory, True, args)
        source = byol.train_source
        indices = torch.arange(args.batch_size)
        images = source.images[indices]

        def step(trainer: Trainer, phase: str):
            def run() -> None:
                trainer.switch.switched = phase == "byol"
                trainer.step([Batch(images, indices)])

            return run

        # What ReLA adds to a step, in isolation: gather the batch's prior rows, the fused
        # transported cosine loss of both views (forward + backward), the score-table update.
        head = rela.learner.rela_head
        features = torch.randn(args.batch_size, rela.learner.feature_dim, device=rela.device)
        z = [head(features).detach().requires_grad_(True) for _ in range(2)]

        def rela_work() -> None:
            prior = rela.prior.rows(indices, rela.device)
            loss = rela_loss((z[0], z[1]), prior, rela.prior.transport)
            loss.mean().backward()
            rela.score_table.update(indices, loss.detach().cpu())

        # Interleave the variants so drifting machine load hits all of them alike.
        times: dict[str, list[float]] = {"byol": [], "rela_byol": [], "rela": [], "rela_work": []}
        runs = {
            "byol": step(byol, "byol"),
            "rela_byol": step(rela, "byol"),
            "rela": step(rela, "rela"),
            "rela_work": rela_work,
        }
        for fn in runs.values():
            median_time(fn, warmup=3, repeat=1)  # warm every variant before timing any
        for _ in range(5):
            for name, fn in runs.items():
                times[name].append(median_time(fn, warmup=1, repeat=max(3, args.repeat // 5)))
        median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
        # The environment holds the load average the timings were taken under.
        shared = {"benchmark": "train_step", "preset": args.preset, "batch_size": args.batch_size,
                  "threads": args.threads, **environment(args.device)}  # fmt: skip
        for name, seconds in median.items():
            per_step = {"seconds": seconds, "images_per_s": args.batch_size / seconds}
            record = {"variant": name, **per_step, "ratio_to_byol": seconds / median["byol"]}
            record.update(shared)
            if not args.no_save:
                append_result("train_step.jsonl", record)
            print(
                f"{name:10s} {1e3 * seconds:8.1f} ms/step  {args.batch_size / seconds:7.0f} img/s  "
                f"x{seconds / median['byol']:.3f} of BYOL"
            )
        overhead = median["rela_byol"] / median["byol"] - 1
        work = median["rela_work"] / median["byol"]
        print(
            f"ReLA-specific work (prior gather + fused loss fwd/bwd + score update): "
            f"{100 * work:.2f}% of a BYOL step (target <= 3%); BYOL-phase step of a ReLA run vs "
            f"a BYOL run: {100 * overhead:+.2f}%; ReLA-phase step vs BYOL step: "
            f"x{median['rela'] / median['byol']:.3f}"
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
