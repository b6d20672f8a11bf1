"""Evaluation of frozen backbone features: weighted kNN and a linear probe.

* kNN (Wu et al. 2018, as used by solo-learn and the ReLA paper): cosine similarities to a bank
  of training features; the ``k`` nearest vote for their class with weight ``exp(sim / T)``
  (k = 200, T = 0.1 by default).
* Linear probe: multinomial logistic regression on standardised frozen features, fitted
  full-batch with L-BFGS (deterministic, converges in ~100 iterations on these sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from rela_train.data.sources import Source

__all__ = ["extract_features", "knn_accuracy", "linear_probe_accuracy"]


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    source: Source,
    *,
    size: int,
    device: torch.device,
    batch_size: int = 512,
    channels_last: bool = False,
    autocast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float32 features [n, D] on CPU, int64 labels [n])`` for every readable image of
    ``source`` (no augmentation). ``encode`` is applied in whatever mode the caller set (use
    ``eval()`` for BatchNorm running statistics)."""
    features, labels = [], []
    context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    for images, indices in source.eval_batches(size, batch_size):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with context:
            out = encode(images)
        features.append(out.float().cpu())
        labels.append(source.labels[indices])
    if not features:
        raise ValueError(f"{source.name}: no readable images to evaluate")
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of the similarity-weighted kNN classifier (cosine similarity)."""
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("kNN: need at least one training and one test feature")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    correct = 0
    for start in range(0, test_features.shape[0], chunk):
        query = F.normalize(test_features[start : start + chunk].float(), dim=1)
        similarity, neighbours = (query @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[neighbours], weights)
        correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk]).sum())
    return correct / test_features.shape[0]


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    iterations: int = 100,
    l2: float = 1e-4,
) -> float:
    """Top-1 test accuracy of a logistic-regression probe on frozen features."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0).clamp_min(1e-6)
    x_train = ((train_features - mean) / std).float()
    x_test = ((test_features - mean) / std).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = nn.Linear(x_train.shape[1], num_classes)
    if iterations > 0:
        optimizer = torch.optim.LBFGS(
            probe.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(probe(x_train), train_labels)
            loss = loss + l2 * probe.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    with torch.no_grad():
        predictions = probe(x_test).argmax(dim=1)
    return float((predictions == test_labels).float().mean())
