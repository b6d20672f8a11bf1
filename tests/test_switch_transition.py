"""``--switch-transition`` (issue 18): each transition does what docs/switch.md says -- the loss
weights and learning rate at each step, which parameters move -- a run stopped mid-transition
resumes bit for bit, and bad values are refused in one line naming the flag. Also
``--eval-steps`` / ``--eval-steps-window``: kNN around the switch without changing the training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rela_train import cli
from rela_train.byol import byol_loss
from rela_train.config import TrainConfig
from rela_train.engine import TIME_FIELDS, Hooks, Trainer
from rela_train.learner import Objective, build_learner
from rela_train.presets import apply_recipe, get_preset
from rela_train.rela import rela_loss
from rela_train.runs import fit
from rela_train.transition import LR_DROP, MEASURED_BEST, Transition, parse_transition

import rela_kernels as rk


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# 4 epochs of 8 steps; the const:0.25 step rule switches after step 8 (the end of epoch 0).
SWITCH_AFTER = 8


def _config(transition: str, **changes) -> TrainConfig:
    values = dict(
        prior="pixels:8", budget=0.5, epochs=4, switch="const:0.25", eval_every=0,
        probe_epochs=0, lr_schedule="constant", switch_transition=transition,
    )  # fmt: skip
    values.update(changes)
    return get_preset("synthetic-test").replace(**values)


def _lines(run: Path) -> list[dict]:
    ignore = {*TIME_FIELDS, "run_dir"}
    return [
        {k: v for k, v in json.loads(line).items() if k not in ignore}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def _steps(run: Path) -> list[dict]:
    return [line for line in _lines(run) if "event" not in line]


# ----------------------------------------------------------------------------------------------
# The schedule of each transition, as a function of the steps since the switch
# ----------------------------------------------------------------------------------------------


def test_parse_and_the_per_step_schedules() -> None:
    assert parse_transition("hard").hard and parse_transition("hard") == Transition()
    blend = parse_transition("blend:3")
    assert [blend.rela_weight(i) for i in (None, 0, 1, 2, 3, 10)] == [0, 0.75, 0.5, 0.25, 0, 0]
    drop = parse_transition("lr-drop:4")
    expected = [1.0, LR_DROP, 0.325, 0.55, 0.775, 1.0, 1.0]
    got = [drop.lr_multiplier(i) for i in (None, 0, 1, 2, 3, 4, 9)]
    assert got == pytest.approx(expected)
    warm = parse_transition("warm-heads:2")
    assert [warm.freeze_backbone(i) for i in (None, 0, 1, 2)] == [False, True, True, False]
    keep = parse_transition("keep-views")
    assert keep.view_phase("byol") == "rela" and Transition().view_phase("byol") == "byol"
    both = parse_transition("reset-target+blend:5")
    assert both == Transition(blend_steps=5, reset_target=True)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("soft", "unknown transition 'soft'"),
        ("blend", "positive whole number"),
        ("blend:0", "positive whole number"),
        ("blend:-3", "positive whole number"),
        ("warm-heads:x", "positive whole number"),
        ("reset-target:3", "takes no value"),
        ("blend:3+blend:4", "given twice"),
        ("hard+blend:3", "unknown transition 'hard'"),
    ],
)
def test_bad_transitions_are_refused(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="--switch-transition") as caught:
        parse_transition(text)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def _cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, *flags: str) -> tuple[int, str]:
    argv = ["fit", "--preset", "synthetic-test", "--out", str(tmp_path / "runs" / "r"), *flags]
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--prior", "pixels:8", "--switch-transition", "fade:3"], "unknown transition"),
        (["--prior", "pixels:8", "--switch-transition", "blend:0"], "positive whole number"),
        (["--prior", "pixels:8", "--switch", "never", "--switch-transition", "blend:5"],
         "--switch is never"),
        (["--switch-transition", "keep-views"], "needs ReLA"),
        (["--prior", "pixels:8", "--eval-steps-window", "3:5"], "--eval-steps N >= 1"),
        (["--prior", "pixels:8", "--eval-steps", "2", "--eval-steps-window", "3"], "BEFORE:AFTER"),
        (["--prior", "pixels:8", "--switch", "never", "--eval-steps", "2",
          "--eval-steps-window", "3:5"], "needs ReLA with a switch"),
    ],
)  # fmt: skip
def test_the_cli_refuses_bad_combinations_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: str
) -> None:
    code, err = _cli(capsys, tmp_path, *flags)
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    flag = "--eval-steps-window" if "--eval-steps-window" in flags else "--switch-transition"
    assert flag in last and words in last, last
    assert not (tmp_path / "runs").exists()


def test_the_official_recipe_keeps_hard_and_an_explicit_transition_wins() -> None:
    base = get_preset("synthetic-test").replace(prior="pixels:8", recipe="official")
    assert base.switch_transition == "auto"  # the dataclass default, before the recipe
    official = apply_recipe(base)
    assert official.switch_transition == official.concrete_transition == "hard"
    chosen = apply_recipe(base.replace(switch_transition="blend:7"), explicit={"switch_transition"})
    assert chosen.switch_transition == "blend:7"
    asked = apply_recipe(base, explicit={"switch_transition"})  # `--switch-transition auto`
    assert asked.concrete_transition == MEASURED_BEST


def test_auto_is_the_measured_best_only_where_the_run_switches() -> None:
    assert MEASURED_BEST == "keep-views"  # issue 18's rule (docs/switch.md, "The default")
    default = get_preset("synthetic-test")
    assert default.switch_transition == "auto" and default.recipe == "default"
    cases = [
        ({"prior": "pixels:8"}, MEASURED_BEST),
        ({"prior": "pixels:8", "switch": "const:0.5"}, MEASURED_BEST),
        ({"prior": "pixels:8", "switch": "never"}, "hard"),  # no switch to shape
        ({}, "hard"),  # BYOL alone
        ({"prior": "pixels:8", "switch_transition": "blend:3"}, "blend:3"),
    ]
    for changes, expected in cases:
        assert default.replace(**changes).concrete_transition == expected, changes
    # auto is valid wherever hard is: with --switch never and without a prior.
    default.replace(prior="pixels:8", switch="never").validate()


# ----------------------------------------------------------------------------------------------
# The blended loss, on the objective itself
# ----------------------------------------------------------------------------------------------


def test_the_blend_is_the_weighted_sum_of_both_losses() -> None:
    config = get_preset("synthetic-test")
    torch.manual_seed(0)
    learner = build_learner(config, 3, 4, 5)
    transport = rk.Transport(torch.randn(6), torch.randn(6, 5))
    objective = Objective(learner, transport).eval()  # BatchNorm: the same numbers each call
    views = [torch.randn(8, 3, 12, 12), torch.randn(8, 3, 12, 12)]
    prior = torch.randn(8, 6)
    byol, _, _ = objective(views, "byol", prior, True)
    rela, _, _ = objective(views, "rela", prior, True)
    blend, score, _ = objective(views, "byol", prior, True, rela_weight=0.25)
    torch.testing.assert_close(blend, 0.25 * rela + 0.75 * byol)
    torch.testing.assert_close(score, 0.25 * rela + 0.75 * byol / 4)
    # the pieces are what the library computes
    f1, f2 = learner.byol.backbone(views[0]), learner.byol.backbone(views[1])
    head = learner.rela_head
    torch.testing.assert_close(rela, rela_loss((head(f1), head(f2)), prior, transport))
    q = (learner.byol.predict(f1), learner.byol.predict(f2))
    z = (learner.byol.target(views[0]), learner.byol.target(views[1]))
    torch.testing.assert_close(byol, byol_loss(q, z))


# ----------------------------------------------------------------------------------------------
# Which parameters move, step by step, in real runs
# ----------------------------------------------------------------------------------------------


def _watch(config: TrainConfig, run: Path) -> tuple[list[dict], list[dict]]:
    """States of the learner's parts after every step, and the step records."""
    states: list[dict] = []

    def grab(trainer: Trainer) -> None:
        byol = trainer.learner.byol
        states.append(
            {
                "step": trainer.counters.global_step,
                **{
                    name: {k: v.clone() for k, v in getattr(byol, name).state_dict().items()}
                    for name in ("backbone", "projector", "predictor", "target_backbone")
                },
            }
        )

    assert fit(config, run, hooks=Hooks(on_step_end=grab), log=lambda _: None).status == "finished"
    return states, _steps(run)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_warm_heads_freezes_the_backbone_and_trains_the_heads(tmp_path: Path) -> None:
    states, steps = _watch(_config("warm-heads:3"), tmp_path / "run")
    first = SWITCH_AFTER  # index of the state after step SWITCH_AFTER + 1
    for i in range(first, first + 3):  # the 3 warm-up steps
        assert _same(states[i]["backbone"], states[i - 1]["backbone"]), i  # BN stats too
        assert not _same(states[i]["projector"], states[i - 1]["projector"]), i
        assert not _same(states[i]["predictor"], states[i - 1]["predictor"]), i
    assert not _same(states[first + 3]["backbone"], states[first + 2]["backbone"])
    frozen = [s["backbone_frozen"] for s in steps if s["phase"] == "byol"]
    assert frozen[:4] == [True, True, True, False]
    # In the ReLA phase the projector and predictor never train (the frozen-head default).
    assert _same(states[SWITCH_AFTER - 1]["projector"], states[0]["projector"])


def test_reset_target_copies_the_online_network_at_the_switch(tmp_path: Path) -> None:
    states, _ = _watch(_config("reset-target"), tmp_path / "reset")
    hard, _ = _watch(_config("hard"), tmp_path / "hard")
    at_switch = SWITCH_AFTER - 1  # the state after the switch's step
    assert _same(states[at_switch]["target_backbone"], states[at_switch]["backbone"])
    assert not _same(hard[at_switch]["target_backbone"], hard[at_switch]["backbone"])
    # Before the switch the two runs are the same run.
    assert _same(states[at_switch - 1]["target_backbone"], hard[at_switch - 1]["target_backbone"])


def test_blend_and_lr_drop_weights_and_learning_rates_per_step(tmp_path: Path) -> None:
    _, steps = _watch(_config("blend:3+lr-drop:4"), tmp_path / "run")
    byol = [s for s in steps if s["phase"] == "byol"]
    assert [s["since_switch"] for s in byol[:5]] == [0, 1, 2, 3, 4]
    assert [s["rela_weight"] for s in byol[:5]] == [0.75, 0.5, 0.25, 0.0, 0.0]
    base = steps[0]["lr"]
    assert [s["lr"] / base for s in byol[:6]] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1, 1])
    assert all("rela_weight" not in s for s in steps if s["phase"] == "rela")


def test_keep_views_uses_the_rela_augmentation_after_the_switch(tmp_path: Path) -> None:
    used: list[str] = []
    for transition in ("keep-views", "hard", "auto"):
        trainer = Trainer(_config(transition, epochs=2), tmp_path / transition, log=lambda _: None)
        calls = []
        for phase, augmenter in trainer.augment.items():
            original = augmenter.__call__

            class Spy(type(augmenter)):
                def __call__(self, *args, _phase=phase, _original=original, _calls=calls, **kw):
                    _calls.append(_phase)
                    return _original(*args, **kw)

            augmenter.__class__ = Spy
        assert trainer.run().status == "finished"
        used.append(",".join(sorted(set(calls[SWITCH_AFTER:]))))
        # config.json records the concrete transition: what `auto` means may change, a run not.
        saved = json.loads((tmp_path / transition / "config.json").read_text())
        assert saved["switch_transition"] == (MEASURED_BEST if transition == "auto" else transition)
    assert used == ["rela", "byol", "rela"]


# ----------------------------------------------------------------------------------------------
# Stop and resume mid-transition; step evaluations
# ----------------------------------------------------------------------------------------------

ALL = "blend:4+reset-target+warm-heads:3+keep-views+lr-drop:5"


@pytest.mark.parametrize(
    ("switch", "rule", "stop_after"),
    [
        ("const:0.3", "step", 8),  # before the switch at 10: snapshots pending
        ("const:0.3", "step", 12),  # 2 steps into the transition
        ("const:0.5", "epoch", 18),  # the official rule: switch when epoch 2 starts (step 16)
    ],
)
def test_a_run_stopped_mid_transition_resumes_bit_for_bit(
    tmp_path: Path, switch: str, rule: str, stop_after: int
) -> None:
    config = _config(ALL, eval_steps=2, eval_steps_window="4:6", switch=switch, const_switch=rule)
    full = fit(config, tmp_path / "full", log=lambda _: None)
    stop = Hooks(
        on_step_end=lambda t: t.request_stop() if t.counters.global_step == stop_after else None
    )
    run = tmp_path / "stopped"
    assert fit(config, run, hooks=stop, log=lambda _: None).status == "interrupted"
    resumed = fit(config, run, resume=True, log=lambda _: None)
    assert resumed.status == "finished"
    assert _lines(run) == _lines(tmp_path / "full")
    assert resumed.summary["step_evaluations"] == full.summary["step_evaluations"]
    assert resumed.summary["knn_acc"] == full.summary["knn_acc"]
    final = load_final_state(run), load_final_state(tmp_path / "full")
    assert all(torch.equal(a, b) for a, b in zip(*final, strict=True))


def load_final_state(run: Path) -> list[torch.Tensor]:
    from rela_train.checkpoint import load_checkpoint

    return list(load_checkpoint(run)["learner"].values())


def test_step_evaluations_leave_the_training_unchanged(tmp_path: Path) -> None:
    plain = fit(_config("hard"), tmp_path / "plain", log=lambda _: None)
    probed = fit(
        _config("hard", eval_steps=2, eval_steps_window="5:4"), tmp_path / "probed",
        log=lambda _: None,
    )  # fmt: skip
    assert _steps(tmp_path / "plain") == _steps(tmp_path / "probed")
    assert plain.summary["knn_acc"] == probed.summary["knn_acc"]
    points = probed.summary["step_evaluations"]
    # snapshots at steps 4 and 6 (within 5 steps before the switch at 8), the switch, +2, +4;
    # since_switch as in the step records: 0 is the first BYOL step (step 9)
    assert [p["step"] for p in points] == [4, 6, 8, 10, 12]
    assert [p["since_switch"] for p in points] == [-5, -3, -1, 1, 3]
    assert [p["phase"] for p in points] == ["rela"] * 3 + ["byol"] * 2
    assert all(0 <= p["knn_acc"] <= 1 for p in points)
    # Without a window: every 5 steps of the whole run.
    every = fit(_config("hard", eval_steps=5), tmp_path / "every", log=lambda _: None)
    assert [p["step"] for p in every.summary["step_evaluations"]] == [5, 10, 15, 20, 25, 30]


def test_since_switch_is_one_count_in_every_record(tmp_path: Path) -> None:
    # The step record of step S and the evaluation made after it carry the same since_switch
    # (0: the first BYOL step, S = SWITCH_AFTER + 1), in metrics.jsonl and in the summary.
    run = tmp_path / "run"
    result = fit(
        _config("blend:3", eval_steps=3, eval_steps_window="4:6"), run,
        log=lambda _: None,
    )  # fmt: skip
    steps = {s["step"]: s.get("since_switch") for s in _steps(run)}
    evals = [line for line in _lines(run) if line.get("event") == "step_eval"]
    assert steps[SWITCH_AFTER + 1] == 0
    assert [e["step"] for e in evals] == [6, 8, 11, 14]  # snapshot, the switch, +3, +6
    assert [e["since_switch"] for e in evals] == [-3, -1, 2, 5]
    for point in evals:
        if point["step"] > SWITCH_AFTER:
            assert point["since_switch"] == steps[point["step"]]
    summary = [(p["step"], p["since_switch"]) for p in result.summary["step_evaluations"]]
    assert summary == [(e["step"], e["since_switch"]) for e in evals]
