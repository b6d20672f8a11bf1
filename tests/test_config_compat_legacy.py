"""Runs written before these settings existed (no ``recipe``, ``anneal``, ``switch_scores``,
... keys, and ``selection`` for the policy) load, and resume, with the behaviour they ran with:
every missing key takes its :data:`~rela_train.config.LEGACY_VALUES` value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rela_train.checkpoint import check_checkpoint_config, load_checkpoint
from rela_train.config import LEGACY_VALUES, TrainConfig
from rela_train.engine import TIME_FIELDS, Hooks, Trainer
from rela_train.presets import get_preset
from rela_train.runs import fit


def _old_dict(config: TrainConfig) -> dict:
    """``config`` as a config.json written before those settings and the policy rename."""
    values = config.to_dict()
    for name in LEGACY_VALUES:
        del values[name]
    values["selection"] = values.pop("policy")
    return values


def _legacy(config: TrainConfig) -> TrainConfig:
    return config.replace(**LEGACY_VALUES)


def test_an_old_config_json_takes_the_legacy_values(tmp_path: Path) -> None:
    config = _legacy(get_preset("synthetic-test").replace(policy="infobatch", budget=0.5))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_old_dict(config)))
    loaded = TrainConfig.load(path)
    assert loaded == config
    assert loaded.switch_scores == "keep" and loaded.inbatch_switch_loss == "kept"
    assert loaded.anneal_fraction == 0.0 and loaded.rela_head == "trainable"
    # A new run of the same policy anneals and resets: the legacy values are not the defaults.
    fresh = get_preset("synthetic-test").replace(policy="infobatch")
    assert fresh.anneal_fraction == 0.125 and fresh.switch_scores == "reset"


def test_an_old_checkpoint_config_matches_its_old_config_json(tmp_path: Path) -> None:
    config = _legacy(get_preset("synthetic-test").replace(policy="hard", budget=0.5))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_old_dict(config)))
    loaded = TrainConfig.load(path)
    check_checkpoint_config({"config": _old_dict(config)}, loaded, tmp_path)  # no error
    # The missing key stands for the legacy value, not for whatever config.json says now.
    with pytest.raises(ValueError, match="switch_scores: 'keep' vs 'reset'") as caught:
        check_checkpoint_config(
            {"config": _old_dict(config)}, loaded.replace(switch_scores="reset"), tmp_path
        )
    assert "\n" not in str(caught.value)


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
def test_an_old_run_resumes_across_the_switch_with_its_old_behaviour(tmp_path: Path) -> None:
    # hard at budget 0.5 with a const:0.5 switch: ReLA in epoch 0 (8 steps), BYOL in epoch 1,
    # whose subset is ranked by the ReLA losses (old) or drawn at random after a reset (new).
    base = get_preset("synthetic-test").replace(
        prior="pixels:8", budget=0.5, policy="hard", switch="const:0.5", probe_epochs=5
    )
    legacy = _legacy(base)
    full = fit(legacy, tmp_path / "full", log=lambda _: None)
    new = fit(base, tmp_path / "new", log=lambda _: None)
    assert _metrics(tmp_path / "new") != _metrics(tmp_path / "full")  # the settings matter
    stop = Hooks(on_step_end=lambda t: t.request_stop() if t.counters.global_step == 5 else None)
    run = tmp_path / "old"
    assert fit(legacy, run, hooks=stop, log=lambda _: None).status == "interrupted"
    # Rewrite the run as the code before those settings wrote it: neither config has the new keys.
    (run / "config.json").write_text(json.dumps(_old_dict(legacy), indent=2, sort_keys=True))
    state = load_checkpoint(run)
    state["config"] = _old_dict(legacy)
    torch.save(state, run / "checkpoints" / "last.pt")
    # The command line's config (today's defaults) is overridden by the run's config.json.
    resumed = fit(base, run, resume=True, log=lambda _: None)
    assert resumed.status == "finished" and resumed.summary["steps"] == 16
    assert _metrics(run) == _metrics(tmp_path / "full")
    assert resumed.summary["knn_acc"] == full.summary["knn_acc"]
    assert json.loads((run / "config.json").read_text())["switch_scores"] == "keep"
    assert new.summary["steps"] == 16


@pytest.mark.usefixtures("_keep_threads")
@pytest.mark.parametrize("feed", ["kept", "scored"])
def test_inbatch_switch_loss_chooses_what_the_switch_reads(tmp_path: Path, feed: str) -> None:
    config = get_preset("synthetic-test").replace(
        prior="pixels:8", budget=0.25, policy="inbatch", switch="adaptive", epochs=1,
        eval_every=0, probe_epochs=0, inbatch_switch_loss=feed,
    )  # fmt: skip
    trainer = Trainer(config, tmp_path / "run", log=lambda _: None)
    fed: list[float] = []
    after_step = trainer.switch.after_step

    def spy_after_step(loss: float, step: int) -> bool:
        fed.append(loss)
        return after_step(loss, step)

    trainer.switch.after_step = spy_after_step
    assert trainer.run().status == "finished"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    kept = [r["loss"] for r in map(json.loads, lines) if r.get("phase") == "rela" and "loss" in r]
    assert len(fed) == len(kept) > 0
    # The kept rows are the hardest of the scored batch: their mean is larger.
    assert (fed == kept) == (feed == "kept")
    assert all(f <= k for f, k in zip(fed, kept, strict=True))
