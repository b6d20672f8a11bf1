"""The official ReLA linear probe: checked against a reference written the way
the official ``metrics/lineareval.py`` is (DataLoader over a TensorDataset, Adam 3e-4, batch 128,
mean of the last 3 epochs), and reachable from ``fit --probe`` and ``eval --probe``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from rela_train import cli
from rela_train.evaluate import (
    final_probe_results,
    linear_probe_accuracy,
    official_linear_probe,
)
from rela_train.presets import get_preset
from rela_train.runs import fit
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def blobs(n: int, dim: int, classes: int, seed: int, spread: float = 1.5):
    # The same class centres for every seed: train and test sets of one problem.
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * spread
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    features = centres[labels] + torch.randn(n, dim, generator=g)
    return features, labels


class _Shuffle(Sampler[int]):
    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.n


def reference_probe(x, y, xt, yt, classes, epochs, seed, batch_size=128, lr=3e-4):
    """The official protocol, loop by loop: a shuffled DataLoader per epoch, cross-entropy,
    Adam; the test accuracy after every epoch; mean of the last 3."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(x.shape[1], classes)
    dataset = TensorDataset(x, y)
    # shuffle=True, one permutation per epoch from a generator seeded `seed` (RandomSampler
    # itself draws twice per epoch, so it cannot state the rule).
    loader = DataLoader(dataset, batch_size=batch_size, sampler=_Shuffle(len(x), seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    accs = []
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
        with torch.no_grad():
            accs.append(float((model(xt).argmax(1) == yt).sum()) / len(yt))
    return accs


def test_official_probe_matches_the_reference_loop() -> None:
    x, y = blobs(700, 24, 5, seed=1, spread=0.6)
    xt, yt = blobs(300, 24, 5, seed=2, spread=0.6)
    got = official_linear_probe(x, y, xt, yt, num_classes=5, epochs=6, seed=3)
    want = reference_probe(x, y, xt, yt, 5, epochs=6, seed=3)
    assert list(got.epoch_accuracies) == pytest.approx(want, abs=1e-12)
    assert got.mean == pytest.approx(statistics.mean(want[-3:]))
    assert got.std == pytest.approx(statistics.stdev(want[-3:]))


def test_official_probe_is_deterministic_and_seeded() -> None:
    x, y = blobs(500, 16, 4, seed=4, spread=0.5)
    xt, yt = blobs(200, 16, 4, seed=5, spread=0.5)
    before = torch.random.get_rng_state()
    a = official_linear_probe(x, y, xt, yt, epochs=4, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    b = official_linear_probe(x, y, xt, yt, epochs=4, seed=0)
    c = official_linear_probe(x, y, xt, yt, epochs=4, seed=1)
    assert a == b
    assert a.epoch_accuracies != c.epoch_accuracies


def test_official_probe_uses_raw_features() -> None:
    # The L-BFGS probe standardises, so a per-feature scale cannot change it much; the official
    # probe sees the raw features, so a large scale changes its course.
    x, y = blobs(400, 8, 3, seed=6, spread=0.4)
    xt, yt = blobs(200, 8, 3, seed=7, spread=0.4)
    scale = torch.linspace(0.01, 50.0, 8)
    raw = official_linear_probe(x, y, xt, yt, epochs=3)
    scaled = official_linear_probe(x * scale, y, xt * scale, yt, epochs=3)
    assert raw.epoch_accuracies != scaled.epoch_accuracies


def test_official_probe_learns_separable_classes() -> None:
    x, y = blobs(1000, 32, 4, seed=8, spread=3.0)
    xt, yt = blobs(400, 32, 4, seed=9, spread=3.0)
    result = official_linear_probe(x, y, xt, yt, epochs=30)
    assert result.mean > 0.9 and result.epoch_accuracies[0] < result.mean
    assert len(result.epoch_accuracies) == 30


def test_fewer_epochs_than_the_average_window() -> None:
    x, y = blobs(100, 4, 2, seed=10)
    one = official_linear_probe(x, y, x, y, epochs=1)
    assert one.mean == one.epoch_accuracies[0] and one.std == 0.0


@pytest.mark.parametrize(("name", "value"), [("epochs", 0), ("batch_size", 0), ("last", 0)])
def test_official_probe_refuses_bad_settings(name: str, value: int) -> None:
    x, y = blobs(20, 4, 2, seed=11)
    with pytest.raises(ValueError, match=name):
        official_linear_probe(x, y, x, y, **{name: value})


def test_final_probe_results_dispatch() -> None:
    x, y = blobs(200, 8, 3, seed=12)
    xt, yt = blobs(100, 8, 3, seed=13)
    lbfgs = final_probe_results("lbfgs", x, y, xt, yt, 3, 20)
    assert lbfgs == {
        "linear_acc": linear_probe_accuracy(x, y, xt, yt, num_classes=3, iterations=20)
    }
    official = final_probe_results("official", x, y, xt, yt, 3, 4)
    want = official_linear_probe(x, y, xt, yt, num_classes=3, epochs=4)
    assert official == {"linear_acc_official": want.mean, "linear_acc_official_std": want.std}
    assert final_probe_results("none", x, y, xt, yt, 3, 20) == {}
    assert final_probe_results("official", x, y, xt, yt, 3, 0) == {}


def test_fit_and_eval_with_the_official_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = get_preset("synthetic-test").replace(
        epochs=1, eval_every=0, probe="official", probe_epochs=3
    )
    result = fit(cfg, tmp_path / "run", log=lambda _: None)
    summary = result.summary
    assert summary["probe"] == "official" and summary["linear_acc"] is None
    assert 0.0 <= summary["linear_acc_official"] <= 1.0
    assert summary["linear_acc_official_std"] >= 0.0

    assert cli.main(["eval", str(tmp_path / "run"), "--json", "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["linear_acc_official"] == summary["linear_acc_official"]  # deterministic

    assert cli.main(["eval", str(tmp_path / "run"), "--json", "--probe", "lbfgs"]) == 0
    lbfgs = json.loads(capsys.readouterr().out)
    assert lbfgs["probe"] == "lbfgs" and lbfgs["linear_acc"] is not None
    assert "linear_acc_official" not in lbfgs

    assert cli.main(["eval", str(tmp_path / "run"), "--json", "--probe", "none"]) == 0
    none = json.loads(capsys.readouterr().out)
    assert none["linear_acc"] is None and "linear_acc_official" not in none


def test_eval_refuses_an_unknown_probe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", str(tmp_path), "--probe", "sgd"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--probe" in last and "sgd" in last
