"""Runs written before the ``selection`` -> ``policy`` rename still load, resume and evaluate;
the old flag still parses; the checkpoint's counters keep their names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from rela_train.checkpoint import Counters, check_checkpoint_config, load_checkpoint
from rela_train.cli import build_parser
from rela_train.config import TrainConfig, config_from_args
from rela_train.engine import TIME_FIELDS, Hooks
from rela_train.evaluate import evaluate_checkpoint
from rela_train.presets import get_preset
from rela_train.runs import fit


def _old_dict(config: TrainConfig) -> dict:
    """``config`` as a config.json written before the rename."""
    values = config.to_dict()
    values["selection"] = values.pop("policy")
    return values


def test_an_old_config_json_loads_with_its_policy(tmp_path: Path) -> None:
    config = get_preset("synthetic-test").replace(policy="hard", budget=0.5)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_old_dict(config)))
    loaded = TrainConfig.load(path)
    assert loaded == config and loaded.policy == "hard"
    assert "selection" not in json.loads(loaded.to_json())


def test_a_config_with_both_names_is_refused_in_one_line(tmp_path: Path) -> None:
    values = {**get_preset("synthetic-test").to_dict(), "selection": "easy"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="config has both selection and policy") as caught:
        TrainConfig.load(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("flag", ["--policy", "--selection"])
def test_the_old_flag_is_an_alias(flag: str) -> None:
    args = build_parser().parse_args(["fit", "--preset", "synthetic-test", flag, "infobatch"])
    assert config_from_args(get_preset("synthetic-test"), args).policy == "infobatch"


def test_a_bad_value_of_the_old_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["fit", "--selection", "bogus"])
    assert caught.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_an_old_checkpoint_config_matches_its_run(tmp_path: Path) -> None:
    config = get_preset("synthetic-test").replace(policy="hard", budget=0.5)
    check_checkpoint_config({"config": _old_dict(config)}, config, tmp_path)  # no error
    other = config.replace(policy="easy")
    with pytest.raises(ValueError, match="policy: 'hard' vs 'easy'"):
        check_checkpoint_config({"config": _old_dict(config)}, other, tmp_path)


def test_the_counters_keep_the_checkpoint_keys() -> None:
    # The `counters` entry of every checkpoint written so far; restore reads it by these names.
    assert list(dataclasses.asdict(Counters())) == [
        "epoch", "step_in_epoch", "global_step", "samples_seen", "samples_scored",
        "train_time", "wall_time", "switch_step", "switch_epoch", "metrics_lines",
        "skipped_images",
    ]  # fmt: skip


@pytest.fixture
def _keep_threads():
    # The trainer sets torch's thread count from the config; leave other tests as they were.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    ignore = {*TIME_FIELDS, "run_dir"}
    return [{k: v for k, v in json.loads(line).items() if k not in ignore} for line in lines]


@pytest.mark.usefixtures("_keep_threads")
def test_a_run_written_with_the_old_key_resumes_and_evaluates(tmp_path: Path) -> None:
    config = get_preset("synthetic-test").replace(
        prior="pixels:8", budget=0.5, policy="hard", switch="const:0.5"
    )
    full = fit(config, tmp_path / "full", log=lambda _: None)
    stop = Hooks(on_step_end=lambda t: t.request_stop() if t.counters.global_step == 5 else None)
    run = tmp_path / "old"
    assert fit(config, run, hooks=stop, log=lambda _: None).status == "interrupted"
    # Rewrite the run as the code before the rename wrote it: `selection` in both configs.
    (run / "config.json").write_text(json.dumps(_old_dict(config), indent=2, sort_keys=True))
    checkpoint = run / "checkpoints" / "last.pt"
    state = load_checkpoint(run)
    state["config"] = _old_dict(config)
    torch.save(state, checkpoint)
    resumed = fit(config, run, resume=True, log=lambda _: None)
    assert resumed.status == "finished" and resumed.summary["policy"] == "hard"
    assert _metrics(run) == _metrics(tmp_path / "full")
    assert resumed.summary["knn_acc"] == full.summary["knn_acc"]
    state["config"] = _old_dict(config)
    torch.save(state, checkpoint)  # `eval` of an old checkpoint
    evaluated = evaluate_checkpoint(checkpoint, probe_iterations=0, log=lambda _: None)
    assert evaluated["step"] == 5 and 0 <= evaluated["knn_acc"] <= 1
