"""End-to-end `fit` on synthetic data and image folders: every selection policy, exact resume,
the logged switch statistic, eval/report, and the user errors of the command line."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folder import make_image_folder
from rela_train import cli
from rela_train.checkpoint import load_checkpoint
from rela_train.demo import run_demo
from rela_train.engine import TIME_FIELDS, Hooks, Trainer
from rela_train.presets import get_preset
from rela_train.runs import fit

import rela_kernels as rk


@pytest.fixture(autouse=True)
def _keep_threads():
    # The trainer sets torch's thread count from the config; leave other tests as they were.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(**changes):
    return get_preset("synthetic-test").replace(**changes)


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    ignore = {*TIME_FIELDS, "run_dir"}
    return [{k: v for k, v in json.loads(line).items() if k not in ignore} for line in lines]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("policy", ["random", "hard", "easy", "infobatch", "inbatch"])
def test_fit_each_selection_policy(tmp_path: Path, policy: str) -> None:
    cfg = config(prior="pixels:8", budget=0.5, policy=policy, switch="const:0.5")
    result = fit(cfg, tmp_path / "run", log=lambda _: None)
    assert result.status == "finished"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 256 images, budget 0.5 -> 128 per epoch -> 8 steps of 16 back-propagated images.
    assert summary["steps"] == 16 and summary["samples_seen"] == 256
    assert summary["switch_epoch"] == 0 and summary["switch_step"] == 8
    assert summary["knn_acc"] > 0.5  # 4 classes: chance is 0.25
    records = metrics(tmp_path / "run")
    steps = [r for r in records if "event" not in r]
    assert [r["phase"] for r in steps] == ["rela"] * 8 + ["byol"] * 8
    if policy == "inbatch":
        assert summary["samples_scored"] == 512  # 8 steps x 32 scored per epoch
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints/last.pt"):
        assert (tmp_path / "run" / name).is_file()


def test_adaptive_rule_is_applied_to_every_step_loss(tmp_path: Path) -> None:
    fit(config(prior="pixels:8", switch="adaptive"), tmp_path / "run", log=lambda _: None)
    steps = [r for r in metrics(tmp_path / "run") if "event" not in r]
    slow, fast = 2.0, 1.0
    for record in steps:  # the rule never fires in 32 steps; rho must match every step
        rho = math.exp(-max(slow - fast, 0.0))
        fast = 0.999 * fast + 0.001 * record["loss"]
        slow = 0.99 * slow + 0.01 * fast
        assert record["phase"] == "rela" and record["rho"] == pytest.approx(rho, rel=1e-12)


@pytest.mark.parametrize("stop", ["end-of-epoch", "mid-epoch"])
def test_resume_equals_an_uninterrupted_run(tmp_path: Path, stop: str) -> None:
    cfg = config(prior="pixels:8", budget=0.5, policy="infobatch", switch="const:0.5")
    full = fit(cfg, tmp_path / "full", log=lambda _: None)
    if stop == "end-of-epoch":
        hooks = Hooks(on_epoch_end=lambda trainer: trainer.request_stop())
    else:
        # A real SIGTERM mid-epoch: the handler lets the step finish, then checkpoints.
        def terminate(trainer: Trainer) -> None:
            if trainer.counters.global_step == 11:
                os.kill(os.getpid(), signal.SIGTERM)

        hooks = Hooks(on_step_end=terminate)
    first = fit(cfg, tmp_path / "resumed", hooks=hooks, log=lambda _: None)
    assert first.status == "interrupted"
    assert first.signal == (None if stop == "end-of-epoch" else signal.SIGTERM)
    state = load_checkpoint(tmp_path / "resumed")
    assert state["counters"]["global_step"] == (8 if stop == "end-of-epoch" else 11)
    assert not (tmp_path / "resumed" / "summary.json").exists()
    second = fit(cfg, tmp_path / "resumed", resume=True, log=lambda _: None)
    assert second.status == "finished"
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "full")
    a = load_checkpoint(tmp_path / "full")["learner"]
    b = load_checkpoint(tmp_path / "resumed")["learner"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.summary["knn_acc"] == full.summary["knn_acc"]
    assert second.summary["linear_acc"] == full.summary["linear_acc"]


def test_a_finished_run_is_not_overwritten(tmp_path: Path) -> None:
    fit(config(epochs=1, eval_every=0), tmp_path / "run", log=lambda _: None)
    with pytest.raises(ValueError, match="--resume"):
        Trainer(config(epochs=1), tmp_path / "run")


def test_cli_fit_eval_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys, "fit", "--preset", "synthetic-test", "--out", str(run), "--epochs", "1",
        "--optimizer", "adamw", "--lr", "0.01",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["run_dir"] == str(run)
    code, out, err = run_cli(capsys, "eval", str(run), "--json")
    assert code == 0, err
    result = json.loads(out)
    summary = json.loads((run / "summary.json").read_text())
    assert result["knn_acc"] == summary["knn_acc"] and result["epoch"] == 1
    plot = tmp_path / "report.png"
    code, out, err = run_cli(capsys, "report", str(run), str(run), "--plot", str(plot))
    assert code == 0, err
    assert "BYOL" in out and plot.stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--budget", "0"], "--budget: must be in (0, 1]"),
        (["--budget", "1.5"], "--budget: must be in (0, 1]"),
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm"], "dataset-fashion-mnist"),
        (
            ["--dataset", "folder", "--data-dir", "/nonexistent/x", "--val-dir", "/x"],
            "does not exist",
        ),
        (["--switch", "soon"], "--switch"),
    ],
)
def test_cli_user_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run_cli(
        capsys, "fit", "--preset", "synthetic-test", "--out", str(tmp_path / "r"), *argv
    )
    if argv[:2] == ["--preset", "nope"]:
        code, _, err = run_cli(capsys, "fit", "--out", str(tmp_path / "r"), *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_unknown_flag_and_resume_with_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "fit", "--resume", str(tmp_path), "--epochs", "3")
    assert code == 2 and "drop --epochs" in err


def test_prior_store_of_other_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = tmp_path / "store"
    with rk.EmbeddingStore.create_or_resume(
        store_dir, 256, 6, fingerprint="other-data", prior="test", input_size=None
    ) as store:
        store.write_chunk(0, np.random.default_rng(0).standard_normal((256, 6)))
    rk.fit_pca_whitening(rk.EmbeddingStore.open(store_dir), 3).save(store_dir / "transport.pt")
    code, _, err = run_cli(
        capsys, "fit", "--preset", "synthetic-test", "--out", str(tmp_path / "r"),
        "--prior-store", str(store_dir),
    )  # fmt: skip
    assert code == 2 and "was made for other data" in err and "Traceback" not in err


def _folder_config(root: Path, **changes):
    return config(
        dataset="folder", data_dir=str(root / "train"), val_dir=str(root / "val"),
        image_size=12, load_size=14, epochs=1, batch_size=4, eval_every=0, **changes,
    )  # fmt: skip


def test_folder_training_skips_corrupt_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(tmp_path / "train", classes=2, per_class=8, seed=1)
    make_image_folder(tmp_path / "val", classes=2, per_class=3, seed=2)
    (tmp_path / "train" / "class_0" / "zz_broken.png").write_bytes(b"not a png at all")
    (tmp_path / "train" / "class_1" / "zz_cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    messages: list[str] = []
    result = fit(_folder_config(tmp_path), tmp_path / "run", log=messages.append)
    assert result.status == "finished"
    # Counted once each by training (evaluation skips them too, without counting again).
    assert result.summary["skipped_images"] == 2
    warnings = [m for m in messages if m.startswith("warning: skipping unreadable image")]
    assert len(warnings) == 2 and any("zz_broken.png" in m for m in warnings)


def test_folder_with_an_empty_class_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(tmp_path / "train", classes=2, per_class=4, seed=1)
    make_image_folder(tmp_path / "val", classes=2, per_class=2, seed=2)
    (tmp_path / "train" / "class_9").mkdir()
    code, _, err = run_cli(
        capsys, "fit", "--preset", "synthetic-test", "--out", str(tmp_path / "r"),
        "--dataset", "folder", "--data-dir", str(tmp_path / "train"),
        "--val-dir", str(tmp_path / "val"),
    )  # fmt: skip
    assert code == 2 and "class_9 contain no images" in err


def _write_idx(directory: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    prefix = "train" if split == "train" else "t10k"
    for stem, magic, array in (
        (f"{prefix}-images-idx3-ubyte.gz", 0x803, images),
        (f"{prefix}-labels-idx1-ubyte.gz", 0x801, labels),
    ):
        header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
        with gzip.open(directory / stem, "wb") as handle:
            handle.write(header + array.astype(np.uint8).tobytes())


def test_demo_end_to_end_on_tiny_idx_files(tmp_path: Path) -> None:
    """The demo's whole path (IDX data, two runs, table, plot) on a tiny fake Fashion-MNIST."""
    from rela_train.data.synthetic import make_synthetic

    for split, n in (("train", 192), ("test", 64)):
        images, labels, _ = make_synthetic(n, classes=4, channels=1, size=28, split=split)
        _write_idx(tmp_path, split, images[:, 0].numpy(), labels.numpy())
    printed: list[str] = []
    tiny = dict(
        arch="resnet10", width=4, image_size=12, proj_hidden=16, proj_dim=8, batch_size=16,
        rela_dim=8, eval_bank=None, knn_k=10, probe_epochs=10, threads=1,
    )  # fmt: skip
    result = run_demo(
        tmp_path / "demo", data_dir=str(tmp_path), epochs=2, progress=False, overrides=tiny,
        log=lambda _: None, echo=printed.append,
    )  # fmt: skip
    assert result["byol"]["samples_seen"] == 2 * 192 and result["rela"]["samples_seen"] == 192
    text = "\n".join(printed)
    assert "BYOL + ReLA @50% (random)" in text and "kNN" in text
    assert Path(result["plot"]).stat().st_size > 1000


def test_frozen_rela_head_is_not_trained(tmp_path: Path) -> None:
    cfg = config(prior="pixels:8", rela_head="frozen", switch="never", epochs=1, eval_every=0)
    trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
    head = trainer.learner.rela_head
    initial = head.weight.detach().clone()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(head.weight) not in optimized and id(head.bias) not in optimized
    assert trainer.run().status == "finished"
    assert torch.equal(head.weight, initial)


def test_folder_training_with_a_prior_embeds_the_folder(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", classes=2, per_class=8, seed=3)
    make_image_folder(tmp_path / "val", classes=2, per_class=3, seed=4)
    cfg = _folder_config(tmp_path, prior="pixels:6", rela_dim=4, switch="never")
    result = fit(cfg, tmp_path / "run", log=lambda _: None)
    assert result.status == "finished" and result.summary["switch_step"] is None
    store = rk.EmbeddingStore.open(tmp_path / "run" / "prior")
    assert store.complete and store.shape == (16, 6 * 6 * 3)
    # The transport has the requested width (--rela-dim), as for in-memory data.
    transport = rk.Transport.load(tmp_path / "run" / "prior" / "transport.pt")
    assert transport.out_dim == 4
    assert load_checkpoint(tmp_path / "run")["learner"]["rela_head.weight"].shape[0] == 4
