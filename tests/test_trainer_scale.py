"""The ImageNet-scale settings of the trainer on CPU: presets and the global batch, loader-side
crops with a mid-epoch phase switch (exact resume included), and checkpoints that must be refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from rela_train.build import accumulation_steps
from rela_train.checkpoint import load_checkpoint
from rela_train.config import TrainConfig, add_config_arguments, config_from_args
from rela_train.data.jpeg_folder import make_jpeg_folder
from rela_train.engine import TIME_FIELDS, Hooks, Trainer
from rela_train.presets import PRESETS, get_preset
from rela_train.runs import fit


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("jpegs")
    train = make_jpeg_folder(root / "train", classes=3, per_class=16, size_range=(30, 90), seed=3)
    val = make_jpeg_folder(root / "val", classes=3, per_class=2, size_range=(30, 90), seed=4)
    return train, val


def folder_config(folders: tuple[Path, Path], **changes) -> TrainConfig:
    train, val = folders
    base = dict(
        dataset="folder", data_dir=str(train), val_dir=str(val), image_size=16, load_size=20,
        batch_size=8, epochs=2, eval_every=0, probe_epochs=5, knn_k=5,
    )  # fmt: skip
    return get_preset("synthetic-test").replace(**{**base, **changes})


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    ignore = {*TIME_FIELDS, "run_dir"}
    return [{k: v for k, v in json.loads(line).items() if k not in ignore} for line in lines]


def test_every_preset_is_valid() -> None:
    for name in PRESETS:
        config = get_preset(name)
        if config.dataset == "folder":
            with pytest.raises(ValueError, match="--data-dir"):
                config.validate()
            config = config.replace(data_dir="train", val_dir="val")
        assert isinstance(config.validate(), TrainConfig)


def test_imagenet_preset_is_the_paper_recipe() -> None:
    config = get_preset("imagenet-r50-byol").replace(data_dir="train", val_dir="val")
    assert (config.arch, config.image_size, config.optimizer) == ("resnet50", 224, "lars")
    assert (config.lr, config.weight_decay, config.warmup_epochs) == (0.45, 1e-6, 10.0)
    assert (config.ema_base, config.epochs, config.global_batch) == (0.99, 100, 4096)
    # 4096 images per step: accumulated on one node, not on two or on a single GPU's 16 passes.
    assert [accumulation_steps(config, world) for world in (1, 8, 16)] == [16, 2, 1]
    with pytest.raises(ValueError, match="--global-batch: 4096 .* 256 x 3"):
        accumulation_steps(config, 3)
    assert accumulation_steps(config.replace(global_batch=None, accum_steps=3), 5) == 3


def test_zero_unsets_an_optional_setting_of_the_preset() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        ["--global-batch", "0", "--train-subset", "0", "--accum-steps", "2", "--data-dir", "d",
         "--val-dir", "v"]
    )  # fmt: skip
    config = config_from_args(get_preset("imagenet-r50-byol"), args)
    assert config.global_batch is None and config.train_subset is None
    assert config.accum_steps == 2
    with pytest.raises(ValueError, match="--global-batch: must be >= 1"):
        get_preset("synthetic-test").replace(global_batch=-1)


def test_bad_scale_settings_name_their_flag() -> None:
    base = get_preset("synthetic-test")
    for changes, flag in [
        ({"dist_timeout": 0.0}, "--dist-timeout"),
        ({"prefetch": 0}, "--prefetch"),
        ({"decoder": "turbo"}, "--decoder"),
    ]:
        with pytest.raises(ValueError, match=flag):
            base.replace(**changes)
    with pytest.raises(ValueError, match="--sync-bn: synchronised BatchNorm needs CUDA"):
        Trainer(base.replace(sync_bn=True), "unused-run-dir")


def test_loader_crops_restart_at_a_mid_epoch_switch_and_resume_exactly(
    tmp_path: Path, folders
) -> None:
    # 48 images, batch 8: 6 steps an epoch; the switch after step 3 falls mid-epoch.
    config = folder_config(folders, workers=2, prior="pixels:8", switch="const:0.25")
    calls: list[tuple[int, int, int]] = []

    def count_streams(trainer: Trainer) -> None:
        if not hasattr(trainer.train_source, "_counted"):
            batches = trainer.train_source.batches

            def counted(index_batches, plan=None):
                calls.append(
                    (trainer.counters.epoch, trainer.counters.step_in_epoch, len(index_batches))
                )
                return batches(index_batches, plan)

            trainer.train_source.batches = counted
            trainer.train_source._counted = True

    full = fit(
        config, tmp_path / "full", hooks=Hooks(on_step_end=count_streams), log=lambda _: None
    )
    assert full.status == "finished" and full.summary["switch_step"] == 3
    # Epoch 0's stream was rebuilt after the switch (step 3) for the BYOL crops of the rest.
    assert (0, 3, 3) in calls and (1, 0, 6) in calls

    def stop_mid_epoch(trainer: Trainer) -> None:
        if trainer.counters.global_step == 2:
            trainer.request_stop()

    first = fit(
        config, tmp_path / "resumed", hooks=Hooks(on_step_end=stop_mid_epoch), log=lambda _: None
    )
    assert first.status == "interrupted"
    second = fit(config, tmp_path / "resumed", resume=True, log=lambda _: None)
    assert second.status == "finished"
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "full")
    a = load_checkpoint(tmp_path / "full")["learner"]
    b = load_checkpoint(tmp_path / "resumed")["learner"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    small = get_preset("synthetic-test").replace(epochs=2, eval_every=0, probe_epochs=0)
    stop = Hooks(on_epoch_end=lambda trainer: trainer.request_stop())
    fit(small, tmp_path / "a", hooks=stop, log=lambda _: None)
    fit(small.replace(width=8), tmp_path / "b", hooks=stop, log=lambda _: None)
    # Run b's checkpoint copied into run a (another preset / settings): refused, naming why.
    shutil.copy(tmp_path / "b/checkpoints/last.pt", tmp_path / "a/checkpoints/last.pt")
    with pytest.raises(ValueError, match="other settings .*width: 8 vs 4"):
        fit(small, tmp_path / "a", resume=True, log=lambda _: None)
    # Same settings but weights of another shape (a damaged or hand-made checkpoint).
    state = load_checkpoint(tmp_path / "b")
    state["config"] = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["config"]
    state["config"]["width"] = 4
    torch.save(state, tmp_path / "a/checkpoints/last.pt")
    with pytest.raises(ValueError, match="model does not match"):
        fit(small, tmp_path / "a", resume=True, log=lambda _: None)
