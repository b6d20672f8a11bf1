"""Data selection for supervised training: InfoBatch and in-batch hardest-k against full data.

A small CNN classifier on Fashion-MNIST is trained three ways for the same number of epochs:
- full data: every sample every epoch;
- InfoBatch (Qin et al., ICLR 2024) through ``rk.ScoreTable`` + ``rk.SubsetSampler``: each epoch
  keeps the samples whose last loss is at least the mean and a random share of the rest, whose
  losses are scaled up by the inverse share; the last 12.5% of the epochs use all data;
- in-batch hardest-k through ``rk.select_in_batch``: each batch of 2B samples is scored without
  gradients and only its B highest-loss samples are back-propagated.
It prints a table of test accuracy and compute (samples back-propagated, samples forwarded,
training time).

    python examples/supervised_selection.py --tiny     # seconds (the test)
    python examples/supervised_selection.py --full     # 60,000 images, 8 epochs

Fashion-MNIST is read from --data-dir or Debian's location when present; synthetic data
otherwise (or with --synthetic).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from example_utils import Data, SmallCNN, add_common_arguments, augment, fail, load_data
from torch import nn

import rela_kernels as rk

PROG = "supervised_selection.py"
METHODS = ("full", "infobatch", "inbatch")
LABELS = {
    "full": "full data",
    "infobatch": "InfoBatch (SubsetSampler + ScoreTable)",
    "inbatch": "in-batch hardest-k (select_in_batch)",
}


def classifier() -> nn.Module:
    backbone = SmallCNN(width=16)
    return nn.Sequential(backbone, nn.Linear(backbone.out_dim, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    predicted = torch.cat([model(x[i : i + 1024]).argmax(1) for i in range(0, len(x), 1024)])
    model.train()
    return float((predicted == y).float().mean())


def batches(order: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(order) - size + 1, size):  # whole batches only
        yield order[start : start + size]


def train(method: str, data: Data, args: argparse.Namespace, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    n, epochs, batch = len(data.train_y), args.epochs, args.batch_size
    # Per-sample last loss, for InfoBatch. Unseen samples start at --score-init, by default
    # above the first losses (cross entropy over 10 classes starts near ln 10 = 2.3), so they
    # count as hard until scored.
    table = rk.ScoreTable(n, init=args.score_init)
    sampler = rk.SubsetSampler(
        n, args.budget, "infobatch", score_table=table, seed=seed, anneal=0.125, epochs=epochs
    )
    backprop = forward = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        if method == "infobatch":
            sampler.set_epoch(epoch)  # reads the table: this epoch's subset and loss weights
            order = torch.as_tensor(list(sampler))
        else:
            order = torch.randperm(n, generator=g)
        # inbatch scores 2B samples to back-propagate B of them.
        size = round(batch / args.keep) if method == "inbatch" else batch
        steps = max(1, len(order) // size)
        for step, index in enumerate(batches(order, size)):
            # Cosine learning rate over each run's own epochs, whatever its steps per epoch.
            progress = (epoch + step / steps) / epochs
            for group in optimizer.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * progress))
            x, y = augment(data.train_x[index], g), data.train_y[index]
            if method == "inbatch":
                model.eval()  # scoring: no gradients, BatchNorm statistics untouched
                with torch.no_grad():
                    scores = F.cross_entropy(model(x), y, reduction="none")
                model.train()
                keep = rk.select_in_batch(scores, args.keep)  # the hardest rows
                forward += len(index)
                x, y = x[keep], y[keep]
            losses = F.cross_entropy(model(x), y, reduction="none")
            if method == "infobatch":
                loss = (losses * sampler.weight_of(index)).mean()  # rescaled kept low-loss rows
                table.update(index, losses.detach())
            else:
                loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            backprop += len(y)
            forward += len(y)
    train_time = time.perf_counter() - start
    acc = accuracy(model, data.test_x, data.test_y)
    return {"acc": acc, "backprop": backprop, "forward": forward, "time": train_time}


def summarise(runs: list[dict[str, float]], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict[str, list[dict[str, float]]]) -> str:
    full_acc, _ = summarise(results["full"], "acc")
    full_backprop, _ = summarise(results["full"], "backprop")
    full_time, _ = summarise(results["full"], "time")
    lines = [
        "| method | test accuracy % | vs full (points) | samples back-propagated | "
        "samples forwarded | training time s |",
        "|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        acc, acc_std = summarise(runs, "acc")
        backprop, _ = summarise(runs, "backprop")
        forward, _ = summarise(runs, "forward")
        seconds, _ = summarise(runs, "time")
        spread = f" ± {100 * acc_std:.2f}" if len(runs) > 1 else ""
        lines.append(
            f"| {LABELS[method]} | {100 * acc:.2f}{spread} | {100 * (acc - full_acc):+.2f} | "
            f"{backprop:,.0f} ({backprop / full_backprop:.0%}) | {forward:,.0f} | "
            f"{seconds:.1f} ({seconds / full_time:.0%}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="4,096 images, 3 epochs (the test)")
    size.add_argument("--full", action="store_true", help="60,000 images, 8 epochs")
    parser.add_argument("--epochs", type=int, default=None, help="override the size's epochs")
    parser.add_argument("--seeds", type=int, default=1, help="runs per method (mean ± std)")
    parser.add_argument("--budget", type=float, default=0.5, help="InfoBatch: kept fraction")
    parser.add_argument("--keep", type=float, default=0.5, help="in-batch: kept fraction")
    parser.add_argument(
        "--score-init", type=float, default=3.0, help="InfoBatch: score of unseen samples"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="back-propagated batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("epochs", "seeds", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(PROG, f"--{name.replace('_', '-')}: expected >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_count, test_count, epochs = (None, None, 8) if args.full else (4096, 512, 3)
    if not args.full and not args.tiny:
        train_count, test_count, epochs = 12_000, 2_000, 8
    args.epochs = args.epochs or epochs
    data = load_data(args, PROG, train_count, test_count)
    print(
        f"data: {data.name}, {len(data.train_y)} training and {len(data.test_y)} test images; "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.seeds} seed(s), "
        f"{torch.get_num_threads()} threads"
    )
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for seed in range(args.seed, args.seed + args.seeds):
        for method in METHODS:
            run = train(method, data, args, seed)
            results[method].append(run)
            print(f"seed {seed} {method}: {100 * run['acc']:.2f}% in {run['time']:.1f} s")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
