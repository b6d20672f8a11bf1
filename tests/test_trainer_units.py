"""Trainer building blocks: switch rule, EMA and LR schedules, BYOL/ReLA losses, LARS,
augmentation ranges, kNN/linear probe, configuration checks."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rela_train.byol import BYOL, byol_loss
from rela_train.config import TrainConfig, parse_switch
from rela_train.data.augment import BYOL_VIEWS, RELA_VIEWS, Augmenter, ViewSpec, sample_view
from rela_train.data.fashion_mnist import load_fashion_mnist
from rela_train.evaluate import knn_accuracy, linear_probe_accuracy
from rela_train.optim import LARS, cosine_ema_tau, lr_factor, parameter_groups
from rela_train.presets import get_preset
from rela_train.rela import AdaptiveSwitch, ConstSwitch, ReLAHead, rela_loss
from torch import nn

import rela_kernels as rk

# -- switch rule ------------------------------------------------------------------------------


def official_switch_step(losses: list[float]) -> int | None:
    """The official rule written out independently: 1-based step after which it switches."""
    slow, fast = 2.0, 1.0
    for step, loss in enumerate(losses, start=1):
        gap = slow - fast
        rho = math.exp(-gap) if gap > 0 else 1.0  # computed before the EMA updates
        fast = fast * 0.999 + loss * 0.001
        slow = slow * 0.99 + fast * 0.01
        if rho >= 0.995:
            return step
    return None


@pytest.mark.parametrize("shape", ["decay", "noisy", "constant-high"])
def test_adaptive_switch_fires_at_the_official_step(shape: str) -> None:
    g = torch.Generator().manual_seed(7)
    n = 8000
    t = torch.arange(n, dtype=torch.float64)
    if shape == "decay":
        losses = 0.3 + 0.9 * torch.exp(-t / 200)
    elif shape == "noisy":
        noise = 0.05 * torch.rand(n, generator=g, dtype=torch.float64)
        losses = 0.5 + 0.6 * torch.exp(-t / 80) + noise
    else:
        losses = torch.full((n,), 1.5, dtype=torch.float64)
    losses = losses.tolist()
    expected = official_switch_step(losses)
    assert expected is not None and 100 < expected < n
    rule = AdaptiveSwitch()
    fired = None
    for step, loss in enumerate(losses, start=1):
        if rule.after_step(loss) and fired is None:
            fired = step
            # Once switched, the state is frozen and stays switched.
            frozen = rule.state_dict()
    assert fired == expected
    assert rule.state_dict() == frozen and rule.switched


def test_adaptive_switch_state_round_trip_and_const_rule() -> None:
    rule = AdaptiveSwitch()
    for loss in (1.0, 0.9, 0.8):
        rule.after_step(loss)
    copy = AdaptiveSwitch()
    copy.load_state_dict(rule.state_dict())
    assert copy == rule
    const = ConstSwitch(0.5, total_steps=8)
    assert [const.after_step(1.0, step) for step in range(1, 9)] == [False] * 3 + [True] * 5
    assert ConstSwitch(0.0, total_steps=8).switched and not ConstSwitch(1.0, 8).switched
    assert parse_switch("const:0.25") == ("const", 0.25)
    for bad in ("const:2", "const:x", "sometimes"):
        with pytest.raises(ValueError, match="--switch"):
            parse_switch(bad)


# -- schedules --------------------------------------------------------------------------------


def test_ema_schedule() -> None:
    assert cosine_ema_tau(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_ema_tau(100, 100, 0.99) == 1.0
    assert cosine_ema_tau(50, 100, 0.99) == pytest.approx(0.995)
    taus = [cosine_ema_tau(s, 100, 0.996) for s in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:], strict=False))
    for s in (0, 13, 77):
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * s / 100) + 1) / 2
        assert taus[s] == pytest.approx(expected, abs=1e-15)


def test_target_network_update_parameters_and_buffers() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    model = BYOL(backbone, 6, hidden_dim=8, out_dim=3)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    model.backbone(torch.randn(5, 4))  # moves the online BN running statistics
    before = {k: v.clone() for k, v in model.target_backbone.state_dict().items()}
    online = model.backbone.state_dict()
    model.update_target(0.9)
    after = model.target_backbone.state_dict()
    for key, value in after.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * online[key])
        else:
            assert torch.equal(value, online[key])  # num_batches_tracked is copied
    assert all(not p.requires_grad for p in model.target_parameters())


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


# -- losses -----------------------------------------------------------------------------------


def test_byol_loss_and_per_sample_losses_match_direct_computation(generator) -> None:
    q1, q2, z1, z2 = (torch.randn(9, 5, generator=generator) for _ in range(4))
    q1.requires_grad_(True)
    q2.requires_grad_(True)
    per_sample = byol_loss((q1, q2), (z1, z2))

    def direct(a, b):
        return 2 - 2 * (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1)

    q1d, q2d = q1.detach().clone().requires_grad_(True), q2.detach().clone().requires_grad_(True)
    expected = direct(q1d, z2) + direct(q2d, z1)
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-5)
    per_sample.mean().backward()
    expected.mean().backward()
    torch.testing.assert_close(q1.grad, q1d.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q2.grad, q2d.grad, rtol=1e-4, atol=1e-6)


def test_rela_loss_matches_direct_computation(generator) -> None:
    p = torch.randn(7, 12, generator=generator)
    transport = rk.fit_pca_whitening(torch.randn(50, 12, generator=generator), 4)
    head = ReLAHead(6, 4)
    f1, f2 = torch.randn(7, 6, generator=generator), torch.randn(7, 6, generator=generator)
    per_sample = rela_loss((head(f1), head(f2)), p, transport)
    y = (p - transport.mean) @ transport.matrix
    expected = 0.5 * (
        (1 - F.cosine_similarity(head(f1), y)) + (1 - F.cosine_similarity(head(f2), y))
    )
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-5)
    frozen = ReLAHead(6, 4, frozen=True)
    assert not any(p.requires_grad for p in frozen.parameters())


# -- LARS -------------------------------------------------------------------------------------


def test_lars_excludes_biases_and_norms_from_decay_and_adaptation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = parameter_groups(model, base_lr=0.5, weight_decay=0.1, tag="m")
    names = {g["name"]: g for g in groups}
    assert len(names["m"]["params"]) == 1 and names["m"]["params"][0] is model[0].weight
    excluded = names["m.bias_norm"]
    assert excluded["lars_exclude"] and excluded["weight_decay"] == 0.0
    assert {id(p) for p in excluded["params"]} == {
        id(model[0].bias), id(model[1].weight), id(model[1].bias)
    }  # fmt: skip
    optimizer = LARS(groups, lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.001)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    grads = {}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
        grads[id(p)] = p.grad.clone()
    optimizer.step()
    # Excluded: plain SGD (first momentum step = the gradient).
    for p in excluded["params"]:
        torch.testing.assert_close(p.detach(), before[id(p)] - 0.5 * grads[id(p)])
    # Regular: weight decay, then the trust ratio eta * |w| / |g + wd w|.
    w = model[0].weight
    w0, g0 = before[id(w)], grads[id(w)]
    update = g0 + 0.1 * w0
    update = update * (0.001 * w0.norm() / update.norm())
    torch.testing.assert_close(w.detach(), w0 - 0.5 * update)


# -- augmentation -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [BYOL_VIEWS[0], BYOL_VIEWS[1], RELA_VIEWS[0]])
def test_augmentation_parameter_ranges(spec: ViewSpec) -> None:
    g = torch.Generator().manual_seed(3)
    n, height, width = 4000, 28, 36
    p = sample_view(spec, g, n, height, width)
    left, top, w, h = p.box.unbind(1)
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + w <= width).all() and (top + h <= height).all() and (w >= 1).all()
    fraction = (w * h) / (height * width)
    # Rounding to whole pixels blurs the bounds slightly.
    assert fraction.min() >= spec.crop_scale[0] * 0.8 and fraction.max() <= 1.0
    ratio = w / h
    assert ratio.min() >= spec.crop_ratio[0] * 0.85 and ratio.max() <= spec.crop_ratio[1] * 1.15
    b, c, s, hue = spec.jitter
    assert p.brightness.min() >= 1 - b and p.brightness.max() <= 1 + b
    assert p.contrast.min() >= 1 - c and p.contrast.max() <= 1 + c
    assert p.saturation.min() >= 1 - s and p.saturation.max() <= 1 + s
    assert p.hue.abs().max() <= hue
    jittered = (p.brightness != 1).double().mean()
    assert abs(float(jittered) - spec.jitter_p) < 0.03
    assert abs(float(p.gray.double().mean()) - spec.gray_p) < 0.03
    assert abs(float(p.flip.double().mean()) - spec.flip_p) < 0.03
    assert abs(float((p.sigma > 0).double().mean()) - spec.blur_p) < 0.03
    blurred = p.sigma[p.sigma > 0]
    if blurred.numel():
        assert blurred.min() >= spec.blur_sigma[0] and blurred.max() <= spec.blur_sigma[1]
    assert abs(float(p.solarize.double().mean()) - spec.solarize_p) < 0.03


def test_augmenter_outputs_and_determinism() -> None:
    images = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8)
    augment = Augmenter(BYOL_VIEWS, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    assert len(a) == 2 and a[0].shape == (6, 3, 16, 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.isfinite(x).all() for x in a)
    # [0, 1] images normalised with mean 0.5, std 0.25 stay in [-2, 2].
    assert all(x.min() >= -2 - 1e-5 and x.max() <= 2 + 1e-5 for x in a)
    gray = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    views = Augmenter(RELA_VIEWS, 20, (0.3,), (0.35,))(gray, torch.Generator().manual_seed(2))
    assert views[0].shape == (5, 1, 20, 20)


def test_identity_view_reproduces_the_image() -> None:
    images = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    spec = ViewSpec(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0
    )
    (view,) = Augmenter([spec], 12, (0, 0, 0), (1, 1, 1))(images, torch.Generator())
    torch.testing.assert_close(view, images.float() / 255, atol=1e-5, rtol=0)


# -- evaluation -------------------------------------------------------------------------------


def test_knn_and_linear_probe_on_separable_features(generator) -> None:
    centers = torch.randn(5, 16, generator=generator) * 5
    train_y = torch.arange(500) % 5
    test_y = torch.arange(200) % 5
    train_x = centers[train_y] + 0.3 * torch.randn(500, 16, generator=generator)
    test_x = centers[test_y] + 0.3 * torch.randn(200, 16, generator=generator)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=200, temperature=0.1) == 1.0
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y, iterations=50) == 1.0
    shuffled = knn_accuracy(train_x, train_y[torch.randperm(500)], test_x, test_y, k=20)
    assert shuffled < 0.5


# -- configuration and data -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"budget": 0.0}, "--budget"),
        ({"budget": 1.5}, "--budget"),
        ({"switch": "later"}, "--switch"),
        ({"prior": "pixels", "prior_store": "x"}, "--prior"),
        ({"dataset": "folder"}, "--data-dir"),
        ({"batch_size": 0}, "--batch-size"),
    ],
)
def test_config_errors_name_the_flag(changes: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        get_preset("synthetic-test").replace(**changes)


def test_unknown_preset_and_config_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("imagenet-huge")
    config = get_preset("fashion-mnist-demo")
    (tmp_path / "config.json").write_text(config.to_json())
    assert TrainConfig.load(tmp_path / "config.json") == config


def _idx(path: Path, magic: int, shape: tuple[int, ...], data: bytes) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + data)


def test_fashion_mnist_idx_reader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 3, 9, 1, 2], dtype=np.uint8)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (5, 28, 28), pixels.tobytes())
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (5,), labels.tobytes())
    images, y, fingerprint = load_fashion_mnist(tmp_path, "test")
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], torch.from_numpy(pixels)) and y.tolist() == [0, 3, 9, 1, 2]
    assert fingerprint.startswith("fashion-mnist:test:")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "train")
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (4,), labels[:4].tobytes())
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist(tmp_path, "test")


def test_prepare_prior_resumes_an_embedding_left_incomplete(tmp_path):
    """A run killed while embedding an in-memory dataset resumes it instead of failing."""
    import numpy as np
    from rela_train.data.sources import TensorSource
    from rela_train.prior.loaders import load_prior
    from rela_train.prior.targets import prepare_prior

    import rela_kernels as rk

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    n = 4500  # more than one 4096-row chunk
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    source = TensorSource(
        "tiny", images, torch.zeros(n, dtype=torch.long), ["a"], "fp-tiny", (0.5,), (0.5,)
    )

    def prepare(run_dir):
        return prepare_prior(
            source=source,
            prior="pixels:4",
            prior_store=None,
            run_dir=run_dir,
            dim=8,
            device=torch.device("cpu"),
            log=lambda message: None,
        )

    uninterrupted = prepare(tmp_path / "whole")
    # The first chunk of the same job, then the "kill": the store exists but is incomplete.
    prior = load_prior("pixels:4", num_rows=n)
    partial = tmp_path / "killed" / "prior"
    rows = uninterrupted.store.array
    with rk.EmbeddingStore.create_or_resume(
        partial,
        n,
        prior.dim,
        fingerprint=source.fingerprint,
        prior=prior.identity,
        input_size=prior.input_size,
        chunk_rows=uninterrupted.store.chunk_rows,
        metadata={"data": source.name, "prior_spec": prior.spec},
    ) as store:
        start, stop = store.pending_chunks()[0]
        assert stop < n, "the test needs more than one chunk"
        store.write_chunk(start, np.asarray(rows[start:stop]))
    assert not rk.EmbeddingStore.open(partial).complete
    resumed = prepare(tmp_path / "killed")
    assert resumed.store.complete
    assert np.array_equal(np.asarray(resumed.store.array), np.asarray(rows))
