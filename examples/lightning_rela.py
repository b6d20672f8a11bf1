"""ReLA in PyTorch Lightning (the framework of the official ReLA code), as small as it can be.

A ``LightningDataModule`` embeds the training images once with a free prior (the images at
14 px), fits the PCA-whitening transport and serves a random 50% of the data per epoch through
``rk.SubsetSampler``; a ``LightningModule`` regresses a small CNN (with a frozen random head)
onto the transported prior embeddings with ``rk.transported_cosine_loss``. kNN accuracy of the
features on the test images is printed at the end.

    python examples/lightning_rela.py --tiny     # seconds (the test)
    python examples/lightning_rela.py --full     # 60,000 images, 10 epochs

Needs ``pip install lightning`` (``make install`` installs it with the project's torch pinned).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from example_utils import SmallCNN, add_common_arguments, augment, fail, knn_accuracy, load_data
from torch import nn

import rela_kernels as rk

PROG = "lightning_rela.py"

try:
    import lightning as L
except ImportError as error:  # one line, not a traceback
    fail(PROG, f"needs the lightning package ({error}); install it with: pip install lightning")


class PriorData(L.LightningDataModule):
    def __init__(self, images: torch.Tensor, dim: int, budget: float, seed: int) -> None:
        super().__init__()
        self.images, self.dim, self.budget, self.seed = images, dim, budget, seed

    def setup(self, stage: str) -> None:
        prior = F.interpolate(self.images, size=14, mode="area").flatten(1)  # the free prior
        self.prior = prior.half()  # stored as the store would: float16 rows
        self.transport = rk.fit_pca_whitening(prior, dim=self.dim)
        self.sampler = rk.SubsetSampler(len(self.images), self.budget, seed=self.seed)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # The sampler yields sample indices; Lightning calls its set_epoch every epoch.
        return torch.utils.data.DataLoader(
            torch.arange(len(self.images)), batch_size=64, sampler=self.sampler, drop_last=True
        )


class ReLAModule(L.LightningModule):
    def __init__(self, data: PriorData, seed: int) -> None:
        super().__init__()
        self.data = data
        self.backbone = SmallCNN(width=16)
        self.head = nn.Linear(self.backbone.out_dim, data.dim, bias=False).requires_grad_(False)
        self.g = torch.Generator().manual_seed(seed)

    def training_step(self, index: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = augment(self.data.images[index], self.g)
        z = self.head(self.backbone(x))
        loss = rk.transported_cosine_loss(
            z, self.data.prior[index], self.data.transport, reduction="mean"
        )
        self.log("rela_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.backbone.parameters(), lr=2e-3, weight_decay=0.01)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="2,048 images, 2 epochs (the test)")
    size.add_argument("--full", action="store_true", help="60,000 images, 10 epochs")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, test, epochs = (None, None, 10) if args.full else (2048, 512, 2)
    if not args.full and not args.tiny:
        train, test, epochs = 12_000, 2_000, 5
    data = load_data(args, PROG, train, test)
    print(f"data: {data.name}, {len(data.train_y)} training and {len(data.test_y)} test images")
    L.seed_everything(args.seed, verbose=False)
    datamodule = PriorData(data.train_x, dim=32, budget=0.5, seed=args.seed)
    module = ReLAModule(datamodule, seed=args.seed)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        use_distributed_sampler=False,  # keep rk.SubsetSampler (it shards by itself under DDP)
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=datamodule)
    loss = float(trainer.callback_metrics["rela_loss"])
    knn = knn_accuracy(module.backbone, data)
    print(f"last ReLA loss {loss:.4f}; kNN accuracy {100 * knn:.2f}%")
    return {"loss": loss, "knn": knn, "sampler_epoch": datamodule.sampler.epoch}


if __name__ == "__main__":
    main()
