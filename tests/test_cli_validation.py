"""Every flag and configuration value is checked once, at start: a bad value gives one error line
naming the flag and the value, exit status 2, no traceback, and nothing is created on disk.

The ``fit`` table covers every numeric and string field of ``TrainConfig`` (a test checks that
no field is missing from it); the other commands' flags are checked by their argparse types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from rela_train import cli
from rela_train.config import TrainConfig
from rela_train.presets import get_preset


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit status and stderr, whether argparse (SystemExit) or the command refused."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, flag: str, value: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    # argparse prints its usage first; the error itself is one line naming flag and value
    # (transportability's own checks name the setting without dashes, as its library API does).
    assert last.startswith("rela-train "), err
    assert flag in last or flag in ("--ridge", "--holdout") and flag[2:] in last, last
    shown = repr(value) if not value.strip() else value
    assert shown.lower() in last.lower(), last


INT_AT_LEAST_ONE = (
    "image_size", "width", "proj_hidden", "proj_dim", "epochs", "accum_steps", "prefetch",
    "rela_dim", "knn_k", "keep_checkpoints",
)  # fmt: skip
INT_AT_LEAST_ZERO = ("workers", "seed", "eval_every", "probe_epochs", "eval_steps")
OPTIONAL_INT = (
    "train_subset", "val_subset", "load_size", "threads", "global_batch", "eval_bank"
)  # fmt: skip
FLOAT_OUT_OF_RANGE = {
    "lr": "0",
    "weight_decay": "-1",
    "momentum": "1",
    "lars_eta": "0",
    "warmup_epochs": "-1",
    "probe_lr": "-0.5",
    "ema_base": "1.5",
    "knn_t": "0",
    "budget": "0",
    "dist_timeout": "0",
    "anneal": "1",
}
STRINGS = {
    "dataset": "bogus",
    "decoder": "bogus",
    "optimizer": "sgd",
    "rela_head": "bogus",
    "recipe": "paper",
    "lr_schedule": "step",
    "lr_scaling": "sqrt",
    "tau_schedule": "linear",
    "proj_hidden_rule": "triple",
    "rela_dim_rule": "max-width",
    "const_switch": "batch",
    "byol_blur": "maybe",
    "prior_preprocess": "clip",
    "probe": "sgd",
    "decay_exclude": "norms",
    "switch_scores": "drop",
    "inbatch_switch_loss": "mean",
    "amp": "fp8",
    "policy": "bogus",
    "arch": "resnet7",
    "device": "cuda:x",
    "switch": "const:2",
    "switch_transition": "bogus",
    "eval_steps_window": "x",
    "prior": "",
    "prior_store": " ",
    "data_dir": "",
    "val_dir": "",
    "tensorboard": "",
    "init_backbone": "",
}
BOOLEAN_SWITCHES = ("small_images", "channels_last", "compile", "sync_bn", "progress")


def _fit_cases() -> list[tuple[str, str]]:
    cases = [("batch_size", "1"), ("batch_size", "0"), ("batch_size", "x")]
    for name in INT_AT_LEAST_ONE:
        cases += [(name, "0"), (name, "x"), (name, "1.5")]
    for name in INT_AT_LEAST_ZERO:
        cases += [(name, "-1"), (name, "two")]
    for name in OPTIONAL_INT:
        cases += [(name, "-1"), (name, "many")]
    for name, out_of_range in FLOAT_OUT_OF_RANGE.items():
        cases += [(name, v) for v in ("nan", "inf", "-inf", "x", out_of_range)]
    cases += list(STRINGS.items())
    # steps >= 1 or a duration > 0
    cases += [("checkpoint_every", v) for v in ("0", "-5", "0m", "30x", "2 h", "1.5", "m")]
    return cases


def test_the_fit_table_covers_every_setting() -> None:
    covered = {name for name, _ in _fit_cases()} | set(BOOLEAN_SWITCHES)
    assert covered == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize(("name", "value"), _fit_cases())
def test_fit_refuses_a_bad_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    flag = "--" + name.replace("_", "-")
    out = tmp_path / "runs" / "r"
    given = [f"{flag}={value}"] if value.startswith("-") else [flag, value]  # -inf: not a flag
    code, err = run_cli(capsys, "fit", "--preset", "synthetic-test", "--out", str(out), *given)
    assert_refused(code, err, flag, value)
    assert not (tmp_path / "runs").exists()  # a failed start leaves nothing behind


OTHER_COMMANDS = [
    ("eval", ["CKPT"], "--threads", "0"),
    ("eval", ["CKPT"], "--threads", "-2"),
    ("eval", ["CKPT"], "--threads", "x"),
    ("eval", ["CKPT"], "--probe-iterations", "-5"),
    ("eval", ["CKPT"], "--probe-iterations", "1e3"),
    ("eval", ["CKPT"], "--device", "cuda:x"),
    ("eval", ["CKPT"], "--data-dir", ""),
    ("eval", ["CKPT"], "--val-dir", ""),
    ("demo", [], "--epochs", "0"),
    ("demo", [], "--epochs", "x"),
    ("demo", [], "--budget", "0"),
    ("demo", [], "--budget", "1.5"),
    ("demo", [], "--budget", "nan"),
    ("demo", [], "--budget", "inf"),
    ("demo", [], "--threads", "0"),
    ("demo", [], "--prior", ""),
    ("demo", [], "--out", ""),
    ("demo", [], "--data-dir", ""),
    ("transportability", ["--a", "A", "--b", "B"], "--ridge", "-1"),
    ("transportability", ["--a", "A", "--b", "B"], "--ridge", "nan"),
    ("transportability", ["--a", "A", "--b", "B"], "--ridge", "inf"),
    ("transportability", ["--a", "A", "--b", "B"], "--holdout", "0"),
    ("transportability", ["--a", "A", "--b", "B"], "--holdout", "1"),
    ("transportability", ["--a", "A", "--b", "B"], "--holdout", "nan"),
    ("transportability", ["--a", "A", "--b", "B"], "--seed", "-1"),
    ("transportability", ["--a", "A", "--b", "B"], "--seed", "x"),
    ("transportability", ["--b", "B"], "--a", ""),
    ("embed", ["--data", "D", "--prior", "pixels", "--out", "O"], "--batch-size", "0"),
    ("embed", ["--data", "D", "--prior", "pixels", "--out", "O"], "--workers", "-1"),
    ("embed", ["--data", "D", "--prior", "pixels", "--out", "O"], "--dim", "0"),
    ("embed", ["--data", "D", "--prior", "pixels", "--out", "O"], "--chunk-rows", "x"),
    ("embed", ["--data", "D", "--prior", "pixels", "--out", "O"], "--input-size", "-3"),
    ("embed", ["--data", "D", "--prior", "pixels", "--out", "O"], "--normalize", "bogus"),
    ("fit", ["--preset", "synthetic-test"], "--out", ""),
    ("fit", [], "--resume", ""),
    ("export", ["RUN"], "--out", ""),
    ("export", ["RUN", "--out", "O"], "--format", "bogus"),
    ("eval", [], "--backbone", ""),
    ("eval", ["--backbone", "F"], "--dataset", "bogus"),
    ("eval", ["--backbone", "F"], "--image-size", "0"),
]


@pytest.mark.parametrize(("command", "before", "flag", "value"), OTHER_COMMANDS)
def test_other_commands_refuse_a_bad_value(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    before: list[str],
    flag: str,
    value: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, command, *before, flag, value)
    assert_refused(code, err, flag, value)
    assert list(tmp_path.iterdir()) == []


def _resume_run(tmp_path: Path, changes: dict | list) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    values = get_preset("synthetic-test").to_dict()
    if isinstance(changes, dict):
        values.update(changes)
        text = json.dumps(values)
    else:
        text = json.dumps(changes)
    (run / "config.json").write_text(text)
    return run


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": "0.2"}, "--lr: expected float, got '0.2' (str)"),
        ({"epochs": 2.5}, "--epochs: expected int, got 2.5 (float)"),
        ({"progress": "yes"}, "--progress: expected bool, got 'yes' (str)"),
        ({"seed": True}, "--seed: expected int, got True (bool)"),
        ({"dataset": 3}, "--dataset: expected str, got 3 (int)"),
        ({"threads": "2"}, "--threads: expected int or null, got '2' (str)"),
        ({"knn_t": math.nan}, "--knn-t: must be a finite number, got nan"),
        ({"weight_decay": math.inf}, "--weight-decay: must be a finite number, got inf"),
        ({"batch_size": 1}, "--batch-size: must be >= 2"),
        ({"no_such_setting": 1}, "unknown configuration keys: no_such_setting"),
        (["not", "an", "object"], "expected a JSON object of settings, got list"),
    ],
)
def test_resume_refuses_a_bad_config_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes, message: str
) -> None:
    run = _resume_run(tmp_path, changes)
    before = sorted(p.name for p in run.iterdir())
    code, err = run_cli(capsys, "fit", "--resume", str(run))
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "config.json" in lines[0], err
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize(
    "changes",
    [
        {"lr": math.nan},
        {"budget": math.inf},
        {"epochs": True},
        {"image_size": 12.0},
        {"prior": 5},
        {"dist_timeout": -math.inf},
    ],
)
def test_the_library_api_validates_the_same_way(changes: dict) -> None:
    with pytest.raises(ValueError, match="^--" + next(iter(changes)).replace("_", "-")):
        get_preset("synthetic-test").replace(**changes)


def test_integer_values_are_accepted_for_float_settings() -> None:
    config = get_preset("synthetic-test").replace(lr=1, weight_decay=0)
    assert config.lr == 1 and config.weight_decay == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"probe_iterations": -5}, "--probe-iterations: expected an integer >= 0, got -5"),
        ({"probe_iterations": 2.5}, "--probe-iterations: expected an integer, got 2.5"),
        ({"threads": 0}, "--threads: expected an integer >= 1, got 0"),
        ({"device": "nowhere"}, "--device: unknown device"),
    ],
)
def test_evaluate_checkpoint_checks_its_arguments(
    tmp_path: Path, changes: dict, message: str
) -> None:
    from rela_train.evaluate import evaluate_checkpoint
    from rela_train.runs import fit

    run = tmp_path / "run"
    config = get_preset("synthetic-test").replace(
        epochs=1, eval_every=0, probe_epochs=0, progress=False, threads=1
    )
    fit(config, run, log=lambda _: None)
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate_checkpoint(run, log=lambda _: None, **changes)
