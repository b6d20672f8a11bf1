"""`--recipe official` and its separate flags (issue 12, item 1): what the recipe sets, that
explicit flags win, old config.json files resume with their old behaviour, and that each
setting reaches the trainer (schedules, head, widths, switch, blur, prior preprocessing)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from rela_train import cli
from rela_train.byol import hidden_width
from rela_train.config import (
    LEGACY_VALUES,
    TrainConfig,
    add_config_arguments,
    config_from_args,
)
from rela_train.data.augment import BYOL_VIEWS, byol_views
from rela_train.engine import Trainer
from rela_train.optim import (
    cosine_ema_tau,
    ema_tau,
    lr_factor,
    lr_scale,
    scheduled_lr_factor,
)
from rela_train.presets import OFFICIAL_RECIPE, apply_recipe, get_preset
from rela_train.prior.loaders import NORMALIZATIONS, load_prior
from rela_train.rela import ConstSwitch, EpochSwitch, build_switch, rela_dim_cap


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def parse(*argv: str, preset: str = "synthetic-test") -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(get_preset(preset), parser.parse_args(list(argv)))


# -- the recipe ------------------------------------------------------------------------------


def test_official_recipe_sets_every_official_value() -> None:
    cfg = parse("--recipe", "official")
    assert cfg.recipe == "official"
    for name, value in OFFICIAL_RECIPE.items():
        assert getattr(cfg, name) == value, name
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("adamw", 1e-3, 0.01)
    assert cfg.lr_schedule == "constant" and cfg.lr_scaling == "none"
    assert cfg.tau_schedule == "constant" and cfg.ema_base == 0.99
    assert cfg.rela_head == "frozen" and cfg.rela_dim_rule == "min-width"
    assert cfg.const_switch == "epoch" and cfg.prior_preprocess == "official"
    assert cfg.proj_hidden_rule == "double" and cfg.probe == "official"
    assert cfg.byol_blur == "off"  # 12 px images: CIFAR-size


def test_official_recipe_keeps_blur_for_large_images() -> None:
    assert parse("--recipe", "official", "--image-size", "64").byol_blur == "on"
    assert parse("--recipe", "official", "--image-size", "32").byol_blur == "off"


def test_explicit_flags_win_over_the_recipe() -> None:
    cfg = parse(
        "--recipe", "official", "--lr", "0.05", "--rela-head", "trainable", "--byol-blur", "on",
        "--lr-schedule", "cosine", "--tau-schedule", "cosine", "--probe", "lbfgs",
        "--const-switch", "step", "--optimizer", "lars",
    )  # fmt: skip
    assert cfg.lr == 0.05 and cfg.rela_head == "trainable" and cfg.byol_blur == "on"
    assert cfg.lr_schedule == "cosine" and cfg.tau_schedule == "cosine"
    assert cfg.probe == "lbfgs" and cfg.const_switch == "step" and cfg.optimizer == "lars"
    # What was not given still comes from the recipe.
    assert (
        cfg.weight_decay == 0.01 and cfg.lr_scaling == "none" and cfg.rela_dim_rule == "min-width"
    )


def test_the_default_recipe_changes_nothing() -> None:
    preset = get_preset("synthetic-test")
    assert parse() == preset
    assert parse("--recipe", "default") == preset
    assert apply_recipe(preset) == preset


def test_frozen_head_is_the_default_and_trainable_is_available() -> None:
    assert TrainConfig().rela_head == "frozen"
    assert parse("--rela-head", "trainable").rela_head == "trainable"


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--recipe", "paper"),
        ("--lr-schedule", "step"),
        ("--lr-scaling", "sqrt"),
        ("--tau-schedule", "linear"),
        ("--rela-dim-rule", "max"),
        ("--const-switch", "batch"),
        ("--byol-blur", "yes"),
        ("--prior-preprocess", "clip"),
        ("--probe", "sgd"),
        ("--proj-hidden-rule", "triple"),
    ],
)
def test_unknown_values_are_one_line_errors_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--preset", "synthetic-test", "--out", str(tmp_path / "r"), flag, value])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in last and value in last
    assert not (tmp_path / "r").exists()


def test_validate_names_the_field_for_a_bad_config_value() -> None:
    with pytest.raises(ValueError, match="^--lr-schedule: .*'weekly'"):
        TrainConfig(lr_schedule="weekly").validate()


# -- config.json compatibility ---------------------------------------------------------------


def test_old_config_without_the_new_keys_resumes_with_the_old_behaviour() -> None:
    old = TrainConfig().to_dict()
    for name in LEGACY_VALUES:
        del old[name]
    loaded = TrainConfig.from_dict(old)
    assert loaded.rela_head == "trainable"  # the default before the official head
    assert loaded.anneal == 0.0 and loaded.anneal_fraction == 0.0
    assert loaded.lr_schedule == "cosine" and loaded.tau_schedule == "cosine"
    assert loaded.lr_scaling == "linear" and loaded.const_switch == "step"
    assert loaded.byol_blur == "on" and loaded.prior_preprocess == "prior"
    assert loaded.probe == "lbfgs" and loaded.proj_hidden_rule == "fixed"
    assert loaded.rela_dim_rule == "fixed" and loaded.recipe == "default"


def test_an_old_infobatch_run_does_not_start_annealing_on_resume() -> None:
    old = TrainConfig(policy="infobatch").to_dict()
    del old["anneal"]
    assert TrainConfig.from_dict(old).anneal_fraction == 0.0
    assert TrainConfig(policy="infobatch").anneal_fraction == 0.125


def test_a_config_with_the_new_fields_round_trips(tmp_path: Path) -> None:
    cfg = parse("--recipe", "official", "--anneal", "0.25")
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert TrainConfig.load(path) == cfg
    assert json.loads(path.read_text())["recipe"] == "official"


# -- the pieces ------------------------------------------------------------------------------


def test_lr_schedules_and_scaling() -> None:
    for step in (0, 3, 50, 99, 100):
        assert scheduled_lr_factor("constant", step, 100, 10) == 1.0
        assert scheduled_lr_factor("cosine", step, 100, 10) == lr_factor(step, 100, 10)
    assert scheduled_lr_factor("cosine", 99, 100, 10) < 0.01
    assert lr_scale("none", 4096) == 1.0 and lr_scale("linear", 512) == 2.0
    with pytest.raises(ValueError, match="--lr-schedule"):
        scheduled_lr_factor("step", 0, 10, 0)


def test_tau_schedules() -> None:
    for step in (0, 5, 10):
        assert ema_tau("constant", step, 10, 0.99) == 0.99
        assert ema_tau("cosine", step, 10, 0.99) == cosine_ema_tau(step, 10, 0.99)
    assert ema_tau("cosine", 10, 10, 0.99) == 1.0


@pytest.mark.parametrize(
    ("fraction", "epochs", "rela_epochs"), [(0.3333, 3, 0), (0.5, 4, 2), (0.34, 3, 1), (1.0, 3, 3)]
)
def test_epoch_const_switch_is_the_official_floor(
    fraction: float, epochs: int, rela_epochs: int
) -> None:
    switch = build_switch(f"const:{fraction}", 1000, const_switch="epoch", epochs=epochs)
    assert isinstance(switch, EpochSwitch)
    # Reference: the official `current_epoch < int(conlam * epochs)` trains ReLA.
    expected = [e < int(fraction * epochs) for e in range(epochs)]
    got = []
    for epoch in range(epochs):
        got.append(not switch.before_epoch(epoch))
        for step in range(5):  # steps never switch an epoch rule
            switch.after_step(0.1, epoch * 5 + step + 1)
    assert got == expected and sum(got) == rela_epochs


def test_step_const_switch_keeps_the_project_semantics() -> None:
    switch = build_switch("const:0.3333", 30, const_switch="step", epochs=3)
    assert isinstance(switch, ConstSwitch) and switch.switch_after == round(0.3333 * 30)


def test_width_rules() -> None:
    assert hidden_width("fixed", 4096, 512) == 4096 and hidden_width("double", 4096, 512) == 1024
    assert rela_dim_cap("fixed", 64, 512) == 64 and rela_dim_cap("min-width", 64, 512) == 512


def test_byol_views_without_blur() -> None:
    assert byol_views(True) == BYOL_VIEWS
    plain = byol_views(False)
    assert [v.blur_p for v in plain] == [0.0, 0.0]
    for got, base in zip(plain, BYOL_VIEWS, strict=True):
        assert dataclasses.replace(got, blur_p=base.blur_p) == base


def test_official_prior_preprocessing() -> None:
    own = load_prior("random:resnet10:1")
    official = load_prior("random:resnet10:1", preprocess="official")
    assert (own.transform.size, own.transform.resize) == (224, 256)
    assert (official.transform.size, official.transform.resize) == (224, 224)
    assert official.transform.mean == NORMALIZATIONS["imagenet"][0]
    assert official.transform.std == NORMALIZATIONS["imagenet"][1]
    assert own.autocast and not official.autocast
    assert official.identity != own.identity  # a store records which preprocessing made it
    pixels = load_prior("pixels:8", preprocess="official")
    assert pixels.transform.mean == NORMALIZATIONS["imagenet"][0]
    with pytest.raises(ValueError, match="--prior-preprocess"):
        load_prior("pixels:8", preprocess="clip")


# -- in the trainer --------------------------------------------------------------------------


def test_the_official_recipe_in_the_trainer(tmp_path: Path) -> None:
    cfg = parse(
        "--recipe", "official", "--prior", "pixels:8", "--switch", "const:0.5", "--epochs", "2",
        "--eval-every", "0", "--probe-epochs", "2",
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
    learner = trainer.learner
    feature_dim = learner.feature_dim
    assert learner.byol.projector[0].out_features == 2 * feature_dim
    assert learner.byol.predictor[0].out_features == 2 * feature_dim
    # min(backbone width 32, pixel prior width 3 x 8 x 8)
    assert learner.rela_head.out_features == min(feature_dim, 3 * 8 * 8) == trainer.prior.dim
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) not in optimized for p in learner.rela_head.parameters())
    assert isinstance(trainer.switch, EpochSwitch) and trainer.switch.switch_epoch == 1
    assert all(spec.blur_p == 0.0 for spec in trainer.augment["byol"].views)
    result = trainer.run()
    assert result.status == "finished"
    steps = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [s for s in steps if "step" in s and "lr" in s]
    assert steps and all(s["lr"] == 1e-3 and s["tau"] == 0.99 for s in steps)
    assert {s["phase"] for s in steps if s["epoch"] == 0} == {"rela"}
    assert {s["phase"] for s in steps if s["epoch"] == 1} == {"byol"}
    assert result.summary["switch_epoch"] == 1
    assert math.isfinite(result.summary["linear_acc_official"])


# -- weight decay on biases and norms ------------------------------------------------------------


def _decays(cfg: TrainConfig) -> dict[str, float]:
    """Each parameter group's weight decay, by group name, as the trainer builds them."""
    from rela_train.build import build_optimizer_groups
    from rela_train.learner import build_learner

    learner = build_learner(cfg, channels=1, num_classes=10, rela_dim=None)
    return {
        group["name"]: group["weight_decay"] for group in build_optimizer_groups(learner, cfg, 0.1)
    }


def test_official_recipe_decays_biases_and_norms_and_the_default_spares_them() -> None:
    official = parse("--recipe", "official")
    assert official.decay_exclude == "none"
    decays = _decays(official)
    assert decays["byol"] == decays["byol.bias_norm"] == 0.01
    default = parse("--weight-decay", "0.5")
    assert default.decay_exclude == "bias-norm"
    decays = _decays(default)
    assert decays["byol"] == 0.5 and decays["byol.bias_norm"] == 0.0
    # The flag wins over the recipe, like every other.
    kept = parse("--recipe", "official", "--decay-exclude", "bias-norm")
    assert _decays(kept)["byol.bias_norm"] == 0.0


def test_an_old_official_config_resumes_sparing_biases_and_norms() -> None:
    old = parse("--recipe", "official").to_dict()
    del old["decay_exclude"]
    assert TrainConfig.from_dict(old).decay_exclude == "bias-norm"


def test_decay_exclude_rejects_an_unknown_value() -> None:
    with pytest.raises(SystemExit):
        parse("--decay-exclude", "norms")
    with pytest.raises(ValueError, match="--decay-exclude: .*got .norms."):
        dataclasses.replace(parse(), decay_exclude="norms").validate()
