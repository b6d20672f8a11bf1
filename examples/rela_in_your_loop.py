"""ReLA in your own training loop: plain PyTorch, no ``rela_train``.

What it shows, step by step:
1. a free prior (the images at 14 px, flattened) embeds every training image once, chunk by
   chunk, into an ``rk.EmbeddingStore`` on disk (resumable after a kill);
2. ``rk.fit_pca_whitening`` fits the transport: the whitened top components are the targets;
3. a small CNN with a frozen random linear head is trained with ``rk.transported_cosine_loss``
   on a random 50% of the data per epoch, drawn by ``rk.SubsetSampler``, while
   ``rk.AdaptiveSwitch`` (the official EMA-plateau rule) watches the loss: once it plateaus, the
   ReLA phase is over (a full method moves to its own objective there, BYOL in the paper; this
   example stops training);
4. kNN accuracy of its features on the test images, against the same network untrained.

    python examples/rela_in_your_loop.py --tiny        # seconds, synthetic or real data
    python examples/rela_in_your_loop.py --full        # all 60,000 images, 10 epochs

Fashion-MNIST is read from --data-dir or Debian's location when present; synthetic data
otherwise (or with --synthetic).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from example_utils import SmallCNN, add_common_arguments, augment, knn_accuracy, load_data
from torch import nn

import rela_kernels as rk

PROG = "rela_in_your_loop.py"
PRIOR_SIZE = 14  # the prior: images downsampled to 14 x 14 px, 196 values


def prior_embed(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, size=PRIOR_SIZE, mode="area").flatten(1)


def build_store(images: torch.Tensor, directory: Path) -> rk.EmbeddingStore:
    """Embed every image once into the store; a rerun after a kill writes only what is missing."""
    fingerprint = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
    store = rk.EmbeddingStore.create_or_resume(
        directory,
        len(images),
        PRIOR_SIZE * PRIOR_SIZE,
        fingerprint=fingerprint,
        prior=f"pixels:{PRIOR_SIZE}",
        input_size=PRIOR_SIZE,
        chunk_rows=4096,
    )
    for start, stop in store.pending_chunks():
        store.write_chunk(start, prior_embed(images[start:stop]))
    return store


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="4,096 images, 4 epochs (the test)")
    size.add_argument("--full", action="store_true", help="60,000 images, 10 epochs")
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of data per epoch")
    parser.add_argument("--store", type=Path, default=None, help="store directory (default: tmp)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, test, epochs, dim = (None, None, 10, 64) if args.full else (4096, 1024, 4, 32)
    if not args.full and not args.tiny:
        train, test, epochs = 12_000, 2_000, 5
    data = load_data(args, PROG, train, test)
    print(f"data: {data.name}, {len(data.train_y)} training and {len(data.test_y)} test images")

    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(data.train_x, args.store or Path(tmp) / "store")
        transport = rk.fit_pca_whitening(store, dim=dim)
        print(f"prior: {store.n} x {store.dim} in {store.path}; transport {transport}")

        backbone = SmallCNN(width=16)
        head = nn.Linear(backbone.out_dim, dim, bias=False).requires_grad_(False)  # frozen
        untrained_knn = knn_accuracy(backbone, data)
        optimizer = torch.optim.AdamW(backbone.parameters(), lr=2e-3, weight_decay=0.01)
        n = len(data.train_y)
        sampler = rk.SubsetSampler(n, budget=args.budget, policy="random", seed=args.seed)
        loader = torch.utils.data.DataLoader(
            torch.arange(n), batch_size=64, sampler=sampler, drop_last=True
        )
        g = torch.Generator().manual_seed(args.seed)
        switch, switch_step, step = rk.AdaptiveSwitch(), None, 0
        seen, start = 0, time.perf_counter()
        for epoch in range(epochs):
            if switch_step is not None:
                break
            sampler.set_epoch(epoch)  # a new random 50% every epoch
            total, count = 0.0, 0
            for index in loader:
                targets = store.read(index)  # float16 prior rows of this batch
                z = head(backbone(augment(data.train_x[index], g)))
                loss = rk.transported_cosine_loss(z, targets, transport, reduction="mean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
                count += len(index)
                step += 1
                if switch.update(float(loss.detach())):  # the ReLA loss has plateaued
                    switch_step = step
                    break
            seen += count
            print(
                f"epoch {epoch + 1}/{epochs}: ReLA loss {total / max(count, 1):.4f}, "
                f"rho {switch.rho:.4f}"
                + (f"; the switch fired at step {switch_step}" if switch_step else "")
            )
        train_time = time.perf_counter() - start
        store.close()

    knn = knn_accuracy(backbone, data)
    print(
        f"kNN accuracy: {100 * knn:.2f}% after ReLA on {args.budget:.0%} per epoch "
        f"({seen} samples, {train_time:.1f} s); untrained network: {100 * untrained_knn:.2f}%"
    )
    return {
        "knn": knn,
        "untrained_knn": untrained_knn,
        "samples": seen,
        "switch_step": switch_step,
        "rho": switch.rho,
    }


if __name__ == "__main__":
    main()
