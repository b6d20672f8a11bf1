"""Evaluation of frozen backbone features: weighted kNN and a linear probe.

* kNN (Wu et al. 2018, as used by solo-learn and the ReLA paper): cosine similarities to a bank
  of training features; the ``k`` nearest vote for their class with weight ``exp(sim / T)``
  (k = 200, T = 0.1 by default).
* Linear probe: multinomial logistic regression on standardised frozen features, fitted
  full-batch with L-BFGS (deterministic; it converges within the default 100 iterations on
  these sizes).
* The official ReLA linear probe (``metrics/lineareval.py`` ``linear_eval`` of LINs-lab/ReLA):
  a linear layer on the raw frozen features (no standardisation), Adam at lr 3e-4, mini-batches
  of 128 shuffled each epoch, 100 epochs; the reported figure is the mean (and sample standard
  deviation) of the test accuracy after each of the last 3 epochs. The official code averages
  per-batch accuracies (a short last batch weighs as much as a full one); here the accuracy is
  exact (correct / images). ``--probe`` chooses the final probe (:func:`final_probe_results`).

:func:`evaluate_backbone` is the one evaluation flow: the trainer calls it per epoch and at the
end of a run, :func:`evaluate_checkpoint` (the ``eval`` command) on a saved backbone, and
:func:`evaluate_backbone_file` (``eval --backbone``) on an exported or torchvision state dict.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rela_train.checkpoint import load_checkpoint
from rela_train.config import PROBES, TrainConfig, given_changes
from rela_train.data.sources import Source, build_sources
from rela_train.learner import build_learner
from rela_train.runtime import resolve_device

__all__ = [
    "OfficialProbeResult",
    "RunEvaluator",
    "evaluate_backbone",
    "evaluate_backbone_file",
    "evaluate_checkpoint",
    "extract_features",
    "final_probe_results",
    "knn_accuracy",
    "linear_probe_accuracy",
    "official_linear_probe",
]


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


@dataclass(frozen=True)
class OfficialProbeResult:
    """The official probe's figure (``mean``, ``std`` of the last epochs' test accuracy, as
    fractions) and every epoch's test accuracy."""

    mean: float
    std: float
    epoch_accuracies: tuple[float, ...]


def official_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    batch_size: int = 128,
    lr: float = 3e-4,
    last: int = 3,
    seed: int = 0,
) -> OfficialProbeResult:
    """The official ReLA linear probe on frozen features (see the module docstring).

    Deterministic for a ``seed`` (initialisation and shuffles use their own generators; the
    global RNG is untouched). ``last``: how many final epochs the figure averages (all of them
    when fewer were run).
    """
    for name, value, least in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("last", last, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(
                f"official_linear_probe: {name} must be an int >= {least}, got {value!r}"
            )
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("official_linear_probe: need at least one training and one test feature")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    x_train, x_test = train_features.float(), test_features.float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(x_train.shape[1], num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]
    accuracies = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=shuffle)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(probe(x_train[rows]), train_labels[rows]).backward()
            optimizer.step()
        with torch.no_grad():
            correct = (probe(x_test).argmax(dim=1) == test_labels).sum()
        accuracies.append(int(correct) / x_test.shape[0])
    tail = accuracies[-last:]
    std = statistics.stdev(tail) if len(tail) > 1 else 0.0
    return OfficialProbeResult(statistics.mean(tail), std, tuple(accuracies))


def final_probe_results(
    probe: str,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int,
) -> dict[str, float]:
    """The final evaluation's probe figures for ``--probe``: ``linear_acc`` (``lbfgs``,
    ``epochs`` L-BFGS iterations), ``linear_acc_official`` and ``linear_acc_official_std``
    (``official``, ``epochs`` epochs), nothing for ``none`` or ``epochs == 0``."""
    if probe == "none" or epochs == 0:
        return {}
    args = (train_features, train_labels, test_features, test_labels)
    if probe == "lbfgs":
        return {
            "linear_acc": linear_probe_accuracy(*args, num_classes=num_classes, iterations=epochs)
        }
    if probe == "official":
        official = official_linear_probe(*args, num_classes=num_classes, epochs=epochs)
        return {"linear_acc_official": official.mean, "linear_acc_official_std": official.std}
    raise ValueError(f"--probe: expected lbfgs, official or none, got {probe!r}")


def evaluate_backbone(
    backbone: nn.Module,
    bank: Source,
    val: Source,
    *,
    config: TrainConfig,
    num_classes: int,
    device: torch.device,
    channels_last: bool,
    autocast: bool,
    probe_iterations: int,
    probe: str = "lbfgs",
    extra_bank: Source | None = None,
) -> dict[str, Any]:
    """``knn_acc`` of ``val`` against the features of ``bank``; ``knn_acc_bank`` against
    ``extra_bank`` too when one is given; the figures of the linear probe ``probe`` fitted on
    ``bank``'s features (:func:`final_probe_results`: ``linear_acc`` for ``lbfgs``) when
    ``probe_iterations > 0``. The backbone runs in eval mode (BatchNorm running statistics)
    and is left in the mode it came in."""
    was_training = backbone.training
    backbone.eval()

    def features(source: Source) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(
            backbone,
            source,
            size=config.image_size,
            device=device,
            channels_last=channels_last,
            autocast=autocast,
        )

    def knn(bank_features: torch.Tensor, bank_labels: torch.Tensor) -> float:
        return knn_accuracy(
            bank_features, bank_labels, val_f, val_y, k=config.knn_k,
            temperature=config.knn_t, num_classes=num_classes,
        )  # fmt: skip

    try:
        train_f, train_y = features(bank)
        val_f, val_y = features(val)
        result: dict[str, Any] = {"knn_acc": knn(train_f, train_y)}
        if extra_bank is not None:
            result["knn_acc_bank"] = knn(*features(extra_bank))
    finally:
        backbone.train(was_training)
    result.update(
        final_probe_results(probe, train_f, train_y, val_f, val_y, num_classes, probe_iterations)
    )
    return result


class RunEvaluator:
    """A training run's evaluations: per epoch (and per ``--eval-steps``) kNN on the evaluation
    bank, at the end kNN on the whole training set and the linear probe. Owns the evaluation
    bank, a fixed subset of the training set (``--eval-bank``)."""

    def __init__(
        self,
        config: TrainConfig,
        train: Source,
        val: Source,
        *,
        device: torch.device,
        channels_last: bool,
        autocast: bool,
    ) -> None:
        self.config = config
        self.train, self.val = train, val
        self.device = device
        self.channels_last = channels_last
        self.autocast = autocast
        self._bank: Source | None = None

    def bank(self) -> Source:
        """The fixed subset of the training set that per-epoch kNN uses as its bank."""
        if self._bank is None:
            self._bank = self.train.subset(self.config.eval_bank, seed=1)
        return self._bank

    def __call__(self, backbone: nn.Module, *, final: bool) -> dict[str, Any]:
        """kNN accuracy (not ``final``: on the eval bank); ``final`` also the linear probe and,
        when the bank is a subset, the bank's kNN as ``knn_acc_bank``; ``eval_time`` in s."""
        config = self.config
        start = time.perf_counter()
        bank, extra_bank = self.train, None
        if not final and config.eval_bank is not None:
            bank = self.bank()
        if final and config.eval_bank is not None and config.eval_bank < self.train.n:
            # The accuracy curve's last point uses the same bank as the per-epoch points.
            extra_bank = self.bank()
        try:
            result = evaluate_backbone(
                backbone, bank, self.val, config=config, num_classes=len(self.train.classes),
                device=self.device, channels_last=self.channels_last, autocast=self.autocast,
                probe_iterations=config.probe_epochs if final else 0, probe=config.probe,
                extra_bank=extra_bank,
            )  # fmt: skip
        finally:
            # Evaluation's decoding processes are not kept between evaluations (the training
            # source's are: they serve every epoch).
            for source in (self.val, self._bank):
                if source is not None and source is not self.train:
                    source.close()
        result["eval_time"] = time.perf_counter() - start
        return result

    def close(self) -> None:
        if self._bank is not None:
            self._bank.close()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _eval_device(device: str, threads: int | None) -> torch.device:
    """Set the CPU threads (where given) and resolve ``--device`` for a standalone evaluation."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return resolve_device(device)
    except ValueError as error:
        raise ValueError(f"--device: {error}") from error


def _standalone_scores(
    backbone: nn.Module,
    train: Source,
    val: Source,
    *,
    config: TrainConfig,
    num_classes: int,
    device: torch.device,
    probe_iterations: int | None,
    probe: str | None,
    start: float,
) -> dict[str, Any]:
    """kNN and linear probe of a backbone outside training, and the fields ``eval`` reports.

    Both standalone evaluations (a checkpoint, a backbone file) use the same protocol: the
    configuration's probe and probe epochs unless given, channels_last off, autocast on CUDA
    where the configuration's ``amp`` allows it. ``start`` is when the evaluation began.
    """
    probe = config.probe if probe is None else probe
    result = evaluate_backbone(
        backbone,
        train,
        val,
        config=config,
        num_classes=num_classes,
        device=device,
        channels_last=False,
        autocast=device.type == "cuda" and config.amp != "off",
        probe_iterations=config.probe_epochs if probe_iterations is None else probe_iterations,
        probe=probe,
    )
    return {
        "knn_acc": result["knn_acc"],
        "linear_acc": result.get("linear_acc"),
        "probe": probe,
        **{k: v for k, v in result.items() if k.startswith("linear_acc_official")},
        "train_images": train.n,
        "val_images": val.n,
        "skipped_files": sorted({*train.unreadable(), *val.unreadable()}),
        "eval_time": time.perf_counter() - start,
    }


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    data_dir: str | None = None,
    val_dir: str | None = None,
    val_labels: str | None = None,
    probe_iterations: int | None = None,
    threads: int | None = None,
    probe: str | None = None,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """kNN and linear-probe accuracy of a checkpoint's backbone (a file or a run directory).

    The data come from the checkpoint's configuration; ``data_dir`` / ``val_dir`` point it at
    another copy of the same data (``val_labels``: the labels of a flat ``val_dir``). Unlike the
    evaluations during training, the whole training set is the bank and channels_last is off.
    ``probe`` (``lbfgs``, ``official``, ``none``; default: the run's ``--probe``) chooses the
    linear probe; ``probe_iterations`` its L-BFGS iterations or official epochs (default: the
    run's ``--probe-epochs``).
    """
    if probe is not None and probe not in PROBES:
        raise ValueError(f"--probe: expected one of {', '.join(PROBES)}, got {probe!r}")
    for name, value, least in (("probe_iterations", probe_iterations, 0), ("threads", threads, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer, got {value!r}")
        if value is not None and value < least:
            raise ValueError(
                f"--{name.replace('_', '-')}: expected an integer >= {least}, got {value}"
            )
    state = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(state["config"])
    except ValueError as error:
        raise ValueError(f"{path}: the checkpoint's configuration is not valid: {error}") from error
    changes = given_changes(data_dir=data_dir, val_dir=val_dir, val_labels=val_labels)
    if changes:
        config = config.replace(**changes)
    dev = _eval_device(device, config.threads if threads is None else threads)
    start = time.perf_counter()
    train, val = build_sources(config, warn=log)
    head = state["learner"].get("rela_head.weight")
    learner = build_learner(
        config, state["channels"], len(state["classes"]), None if head is None else head.shape[0]
    )
    learner.load_state_dict(state["learner"])
    backbone = learner.byol.backbone.to(dev)
    scores = _standalone_scores(
        backbone,
        train,
        val,
        config=config,
        num_classes=len(state["classes"]),
        device=dev,
        probe_iterations=probe_iterations,
        probe=probe,
        start=start,
    )
    counters = state["counters"]
    return {
        "checkpoint": str(path),
        "epoch": counters["epoch"],
        "step": counters["global_step"],
        "samples_seen": counters["samples_seen"],
        **scores,
    }


def evaluate_backbone_file(
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    val_dir: str | None = None,
    val_labels: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    probe_iterations: int | None = None,
    threads: int | None = None,
    probe: str | None = None,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """kNN and linear-probe accuracy of a backbone file: one written by ``rela-train export``
    or any torchvision-layout ResNet state dict (a classifier ``fc`` is ignored).

    The net (arch, width, stem) follows from the file's keys and shapes. Where the file has an
    export sidecar (``FILE.json``) the data and the protocol (kNN ``k`` and temperature, probe)
    default to its run's, so ``eval --backbone`` of an exported run repeats the run's own
    evaluation; ``dataset``, ``data_dir``, ``val_dir`` (``val_labels``: a flat one's labels),
    ``image_size`` override them. Without a
    sidecar ``dataset`` is required and ``image_size`` defaults to 224 for the standard stem and
    32 for the small-image stem.
    """
    from rela_train.backbone_io import infer_resnet, load_backbone_file, load_into
    from rela_train.export import SIDECAR_FORMAT, sidecar_path

    if probe is not None and probe not in PROBES:
        raise ValueError(f"--probe: expected one of {', '.join(PROBES)}, got {probe!r}")
    state = load_backbone_file(path, "--backbone")
    spec = infer_resnet(state, "--backbone")
    sidecar = _read_sidecar(sidecar_path(path), SIDECAR_FORMAT)
    if sidecar is not None:
        base = TrainConfig.from_dict(sidecar["run"]["config"])
    elif dataset is None:
        raise ValueError(
            f"--dataset: required with --backbone when the file has no export sidecar "
            f"({sidecar_path(path)}); got none"
        )
    else:
        base = TrainConfig(image_size=224 if not spec.small_images else 32)
    changes: dict[str, Any] = {
        "arch": spec.arch,
        "width": spec.width,
        "small_images": spec.small_images,
        "init_backbone": None,
        **given_changes(
            dataset=dataset,
            data_dir=data_dir,
            val_dir=val_dir,
            val_labels=val_labels,
            image_size=image_size,
        ),
    }
    if dataset is not None and dataset != base.dataset and data_dir is None:
        changes["data_dir"] = None  # the sidecar's data directory belongs to its dataset
    config = base.replace(**changes)
    dev = _eval_device(device, threads)
    start = time.perf_counter()
    train, val = build_sources(config, warn=log)
    try:
        if train.channels != spec.in_channels:
            raise ValueError(
                f"--backbone: expected a backbone for the {train.channels}-channel images of "
                f"{train.name}, got one taking {spec.in_channels} input channels"
            )
        backbone = spec.build()
        load_into(backbone, state, "--backbone")
        scores = _standalone_scores(
            backbone.to(dev),
            train,
            val,
            config=config,
            num_classes=len(train.classes),
            device=dev,
            probe_iterations=probe_iterations,
            probe=probe,
            start=start,
        )
    finally:
        train.close()
        val.close()
    return {
        "backbone": str(path),
        "arch": spec.arch,
        "width": spec.width,
        "stem": spec.stem,
        "dataset": train.name,
        "image_size": config.image_size,
        **scores,
    }


def _read_sidecar(path: Path, expected_format: str) -> dict[str, Any] | None:
    """An export sidecar's contents, None where there is none; a damaged one is an error."""
    if not path.is_file():
        return None
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"--backbone: expected a readable sidecar, got {path} ({error})"
        ) from error
    run = sidecar.get("run") if isinstance(sidecar, dict) else None
    if not isinstance(run, dict) or sidecar.get("format") != expected_format:
        raise ValueError(f"--backbone: expected an export sidecar ({expected_format}), got {path}")
    if not isinstance(run.get("config"), dict):
        raise ValueError(
            f"--backbone: expected a run configuration in the sidecar, got none in {path}"
        )
    return sidecar
