"""``TrainConfig.validate`` checks each field from its metadata (choices, bounds, parser), and
every refusal, per field or across fields, is one line ``--flag: ..., got ...``."""

from __future__ import annotations

import dataclasses

import pytest
from rela_train.config import Bounds, TrainConfig
from rela_train.presets import get_preset

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
BOUNDED = sorted(name for name, f in FIELDS.items() if f.metadata.get("bounds") is not None)
CHOSEN = sorted(name for name, f in FIELDS.items() if f.metadata.get("choices") is not None)


def _outside(bounds: Bounds, kind: type) -> list[float]:
    values = []
    if bounds.low is not None:
        values.append(bounds.low if bounds.low_open else bounds.low - (1 if kind is int else 0.5))
    if bounds.high is not None:
        values.append(
            bounds.high if bounds.high_open else bounds.high + (1 if kind is int else 0.5)
        )
    return values


def test_bounds_read_as_intervals() -> None:
    assert str(Bounds(1)) == ">= 1" and str(Bounds(0, low_open=True)) == "> 0"
    assert str(Bounds(0, 1, high_open=True)) == "in [0, 1)"
    assert str(Bounds(0, 1, low_open=True, note=" s")) == "in (0, 1] s"
    assert 0 in Bounds(0, 1, high_open=True) and 1 not in Bounds(0, 1, high_open=True)
    assert 1 in Bounds(0, 1, low_open=True) and 0 not in Bounds(0, 1, low_open=True)


@pytest.mark.parametrize("name", BOUNDED)
def test_every_bounded_field_refuses_each_side(name: str) -> None:
    field = FIELDS[name]
    bounds = field.metadata["bounds"]
    kind = int if str(field.type).startswith("int") else float
    flag = "--" + name.replace("_", "-")
    outside = _outside(bounds, kind)
    assert outside, name
    for value in outside:
        with pytest.raises(ValueError) as refused:
            get_preset("synthetic-test").replace(**{name: kind(value)})
        assert str(refused.value) == f"{flag}: must be {bounds}, got {kind(value)!r}"


@pytest.mark.parametrize("name", CHOSEN)
def test_every_choice_field_names_its_choices_and_the_value(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    choices = FIELDS[name].metadata["choices"]
    with pytest.raises(ValueError) as refused:
        get_preset("synthetic-test").replace(**{name: "bogus"})
    assert str(refused.value) == f"{flag}: must be one of {', '.join(choices)}, got 'bogus'"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(dataset="folder"), "--data-dir: the folder dataset needs --data-dir"),
        (dict(load_size=4), "--load-size: must be >= --image-size (12), got 4"),
        (dict(prior="pixels", prior_store="s"), "--prior: give either --prior or --prior-store"),
        (dict(policy="inbatch", anneal=0.5), "--anneal: does not apply to --policy inbatch"),
        (dict(switch_transition="keep-views"), "--switch-transition: needs ReLA"),
        (dict(eval_steps_window="1:2"), "--eval-steps-window: needs --eval-steps N >= 1"),
        (dict(device="cuda:x"), "--device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        (dict(arch="resnet7"), "--arch: must be one of resnet10"),
        (dict(val_dir=" "), "--val-dir: must not be empty, got ' '"),
    ],
)
def test_every_check_is_one_line_with_what_came(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        get_preset("synthetic-test").replace(**changes)
    text = str(refused.value)
    assert text.startswith(message) and ", got " in text and "\n" not in text, text


def test_the_configuration_modules_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, rela_train.config, rela_train.presets, rela_train.transition; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
