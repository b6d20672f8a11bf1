"""Runs written before the ``selection`` -> ``policy`` rename still load, resume and evaluate;
the old flag still parses; the checkpoint's counters keep their names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from rela_train.checkpoint import Counters, check_checkpoint_config
from rela_train.cli import build_parser
from rela_train.config import TrainConfig, config_from_args
from rela_train.presets import get_preset


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
