"""The switch study's machinery (benchmarks/study_switch.py) in seconds: the plan's rows,
flags and order, the drop of a run, the table, the default rule, the plot, and the whole script
driven with a stand-in trainer (a script that writes a finished run's summary)."""

from __future__ import annotations

import json
import stat
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import study_switch  # noqa: E402
from rela_study import grid, switch_aggregate, switch_grid  # noqa: E402
from rela_train.step_evals import SINCE_SWITCH  # noqa: E402

FEATURES = {"--recipe", "--probe", "--anneal"}


def _flag(run: grid.RunSpec, name: str) -> str | None:
    flags = list(run.flags)
    return flags[flags.index(name) + 1] if name in flags else None


def test_plan_parts_rows_flags_and_order() -> None:
    steps = switch_grid.STUDY_STEPS
    plan = switch_grid.build_switch_plan(
        grid.DEFAULT_SIZES, steps, [0, 1, 2], best="blend:500", features=FEATURES,
        parts=("factors", "horizon", "views", "long"),
    )  # fmt: skip
    default = switch_grid.build_switch_plan(
        grid.DEFAULT_SIZES, steps, [0, 1, 2], best="blend:500", features=FEATURES
    )
    assert default == [run for run in plan if not run.row.startswith("byol-100-")]
    factors = [run for run in plan if run.row.startswith("switch-")]
    assert len(factors) == 6 * 3 and len(plan) == 6 * 3 + 2 * 3 + 2 * 3 + 4
    # The first seed of every factor runs first, then the next seed.
    assert [run.seed for run in plan[:6]] == [0] * 6 and plan[6].seed == 1
    assert {_flag(run, "--switch-transition") for run in factors} == {
        "hard", "reset-target", "warm-heads:300", "keep-views", "lr-drop:300", "blend:500",
    }  # fmt: skip
    for run in factors:
        assert _flag(run, "--eval-steps") == "100" and _flag(run, "--eval-steps-window") == (
            "300:1000"
        )
        assert _flag(run, "--switch") is None  # the adaptive rule, as the ReLA study
        assert _flag(run, "--recipe") == "official" and _flag(run, "--prior") == "pixels:16"
        assert _flag(run, "--budget") == "0.5" and _flag(run, "--epochs") == "15"
    never = [run for run in plan if "never" in run.row]
    assert all(_flag(run, "--switch") == "never" for run in never)
    assert all(_flag(run, "--switch-transition") is None for run in never)
    byol = [run for run in plan if run.row in ("byol-100", "long-byol-100")]
    assert all(_flag(run, "--prior") is None and _flag(run, "--budget") == "1" for run in byol)
    # The views diagnostic: BYOL on all data from step 0 of a ReLA run, on either augmentation.
    views = [run for run in plan if run.row.startswith("byol-100-")]
    assert len(views) == 2 * 3
    assert all(_flag(r, "--switch") == "const:0" and _flag(r, "--budget") == "1" for r in views)
    assert {_flag(r, "--switch-transition") for r in views} == {"keep-views", "hard"}
    long = [run for run in plan if run.row.startswith("long-")]
    assert [run.seed for run in long] == [0] * 4 and plan[-4:] == long
    assert {_flag(run, "--epochs") for run in long} == {"45"}
    best = next(run for run in long if run.row == "long-rela-50-best")
    assert _flag(best, "--switch-transition") == "blend:500"
    only = switch_grid.build_switch_plan(
        grid.QUICK_SIZES, switch_grid.QUICK_STEPS, [0], parts=("long",), long_seeds=[3, 4],
        best="reset-target", features=FEATURES, switch="const:0.5",
    )  # fmt: skip
    assert [run.seed for run in only] == [3] * 4 + [4] * 4
    assert all(_flag(r, "--switch") in ("const:0.5", "never") for r in only if r.prior)
    with pytest.raises(ValueError, match="--parts"):
        switch_grid.build_switch_plan(
            grid.QUICK_SIZES, switch_grid.QUICK_STEPS, [0], parts=("nope",), best="hard",
            features=FEATURES,
        )  # fmt: skip


def _record(row: str, seed: int, knn: float, curve: list[tuple[int, float]]) -> dict:
    return {
        "row": row, "label": row, "seed": seed, "prior": "pixels:16", "switch_step": 100 + seed,
        "metrics": {"knn_acc": knn, "linear_acc_official": knn + 0.02},
        "step_curve": [{"since_switch": s, "knn_acc": k} for s, k in curve],
    }  # fmt: skip


def test_drop_table_and_verdict() -> None:
    assert switch_aggregate.run_drop(_record("r", 0, 0.8, [(-3, 0.8)])) is None
    drop = switch_aggregate.run_drop(
        _record("r", 0, 0.8, [(-287, 0.79), (0, 0.81), (100, 0.76), (200, 0.78)])
    )
    assert drop == pytest.approx({"peak": 81.0, "low": 76.0, "drop": 5.0})
    # The same points in the trainer's convention (0: the first BYOL step), as records now say.
    stamped = _record("r", 0, 0.8, [(-288, 0.79), (-1, 0.81), (99, 0.76), (199, 0.78)])
    stamped["since_switch"] = SINCE_SWITCH
    assert switch_aggregate.run_drop(stamped) == drop
    assert [switch_aggregate.steps_taken(stamped, p) for p in stamped["step_curve"]] == [
        -287,
        0,
        100,
        200,
    ]
    records = [
        _record("switch-a-hard", s, 0.79 + 0.001 * s, [(-250, 0.8), (0, 0.8), (100, 0.75)])
        for s in range(3)
    ] + [
        _record("switch-f-blend", s, 0.81 + 0.001 * s, [(-250, 0.8), (0, 0.8), (100, 0.79)])
        for s in range(3)
    ]  # fmt: skip
    summaries = switch_aggregate.summarize_switch(records, ["switch-a-hard", "switch-f-blend"])
    assert [s.row for s in summaries] == ["switch-a-hard", "switch-f-blend"]
    assert summaries[0].stats["drop"][0] == pytest.approx(5.0)
    assert summaries[1].stats["knn"] == pytest.approx((81.1, 0.1))
    table = switch_aggregate.format_switch_markdown(summaries)
    assert (
        "| switch-f-blend | 0,1,2 | 80.00 ± 0.00 | 79.00 ± 0.00 | 1.00 ± 0.00 | 81.10 ± 0.10"
        in (table)
    )
    paired = switch_aggregate.format_paired_markdown(
        summaries, "switch-a-hard", ["switch-f-blend", "switch-z-absent"]
    )
    # Seed by seed: +2 points of final kNN (81.0 + s/10 against 79.0 + s/10), 4 points less drop.
    assert paired.splitlines()[-1] == "| switch-f-blend | 0,1,2 | 2.00 ± 0.00 | -4.00 ± 0.00 |"
    assert len(paired.splitlines()) == 3  # a row with no records is left out
    assert switch_aggregate.format_paired_markdown(summaries, "nope", ["switch-f-blend"]) == ""
    pairs = {"switch-a-hard": "long-hard", "switch-f-blend": "long-blend"}
    verdict = switch_aggregate.default_verdict(
        summaries, "switch-a-hard", ["switch-f-blend"], pairs
    )
    assert "long horizon not measured" in verdict and verdict.endswith(
        "Verdict: the default is switch-a-hard"
    )
    long = [_record("long-hard", 0, 0.83, []), _record("long-blend", 0, 0.84, [])]
    summaries = switch_aggregate.summarize_switch(records + long)
    verdict = switch_aggregate.default_verdict(
        summaries, "switch-a-hard", ["switch-f-blend"], pairs
    )
    assert verdict.endswith("Verdict: the default is switch-f-blend")
    two_seeds = switch_aggregate.summarize_switch(records[:2])
    assert "needs 3" in switch_aggregate.default_verdict(
        two_seeds, "switch-a-hard", ["switch-f-blend"], pairs
    )


FAKE_FIT = textwrap.dedent(
    """\
    #!{python}
    # Stands in for `python -m rela_train fit ...`: writes a finished run's summary.
    import json, sys
    from pathlib import Path
    args = sys.argv[1:]
    if "--help" in args:
        print("usage: rela-train fit [--recipe RECIPE] [--probe PROBE]")
        sys.exit(0)
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True)
    prior = "--prior" in args and "never" not in args
    seed = int(args[args.index("--seed") + 1])
    curve = [{{"step": 10 * i, "since_switch": 10 * i - 30, "knn_acc": 0.7 + 0.01 * seed}}
             for i in range(8)] if "--eval-steps" in args else []
    summary = {{
        "knn_acc": 0.75, "linear_acc_official": 0.8, "samples_seen": 100, "train_time": 1.0,
        "wall_time": 1.0, "steps": 10, "switch_step": 30 if prior else None,
        "switch_transition": "hard", "step_evaluations": curve, "evaluations": [],
    }}
    (out / "summary.json").write_text(json.dumps(summary))
    """
)


QUICK_ARGS = ["--quick", "--seeds", "1", "--out"]


def test_the_script_runs_the_quick_grid_with_a_stand_in_trainer(tmp_path: Path) -> None:
    script = tmp_path / "fake_python"
    script.write_text(FAKE_FIT.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "study"
    assert study_switch.main(QUICK_ARGS + [str(out)], python=str(script)) == 0
    lines = (out / "switch.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 8 + 4  # factors, horizon and the long part
    factor = next(r for r in records if r["row"] == "switch-a-hard")
    assert len(factor["step_curve"]) == 8 and factor["switch_transition"] == "hard"
    assert (out / "switch.png").stat().st_size > 0
    table = (out / "switch.md").read_text()
    assert "no verdict: switch-a-hard has 1 seed(s), the rule needs 3" in table
    # --rows picks rows; a rerun finds every record and runs nothing.
    assert study_switch.main(QUICK_ARGS + [str(tmp_path / "one"), "--rows", "byol-100"],
                             python=str(script)) == 0  # fmt: skip
    assert {r.name for r in (tmp_path / "one" / "records").iterdir()} == {
        "byol-100-seed0.json"
    }  # fmt: skip
    with pytest.raises(SystemExit, match="unknown row"):
        study_switch.main(QUICK_ARGS + [str(out), "--rows", "nope"], python=str(script))
    before = (out / "switch.jsonl").read_text()
    assert study_switch.main(QUICK_ARGS + [str(out)], python=str(script)) == 0
    assert (out / "switch.jsonl").read_text() == before


def test_seed_arguments_are_a_count_or_a_list() -> None:
    parse = study_switch.parse_args
    assert parse(["--out", "x", "--seeds", "3"]).seeds == [0, 1, 2]
    assert parse(["--out", "x", "--seeds", "0,4"]).seeds == [0, 4]
    assert parse(["--out", "x", "--long-seeds", "4,"]).long_seeds == [4]  # one seed
    assert parse(["--out", "x", "--long-seeds", "0,"]).long_seeds == [0]
    for bad in ("0", ",", "a,1", "-1"):
        with pytest.raises(SystemExit):
            parse(["--out", "x", "--long-seeds", bad])


def test_the_resolution_transfer_and_decay_parts(tmp_path: Path) -> None:
    steps = switch_grid.STUDY_STEPS
    with pytest.raises(ValueError, match="needs the study directory"):
        switch_grid.build_switch_plan(
            grid.DEFAULT_SIZES, steps, [0], best="keep-views", features=FEATURES,
            parts=("transfer",),
        )  # fmt: skip
    out = tmp_path / "study"
    plan = switch_grid.build_switch_plan(
        grid.DEFAULT_SIZES, steps, [0, 1, 2], best="keep-views", features=FEATURES,
        parts=("res28", "transfer", "decay"), out=out,
    )  # fmt: skip
    by_row: dict[str, list[grid.RunSpec]] = {}
    for run in plan:
        by_row.setdefault(run.row, []).append(run)
    # The Fashion-MNIST prior's network trains first; its one row waits for it.
    assert plan[0].is_pretrain and _flag(plan[0], "--decay-exclude") == "bias-norm"
    fashion = by_row["transfer-fashion-never"]
    assert [run.seed for run in fashion] == [0] and fashion[0].needs == plan[0].run_id
    assert _flag(fashion[0], "--prior") == f"checkpoint:resnet10:{grid.transported_checkpoint(out)}"
    # 28 px: five rows at every seed, the official recipe as it stands, the same pixel prior.
    res28 = [run for run in plan if run.row.startswith("res28-")]
    assert len(res28) == 5 * 3
    for run in res28:
        assert _flag(run, "--image-size") == "28" and _flag(run, "--decay-exclude") == "none"
        assert _flag(run, "--recipe") == "official" and _flag(run, "--epochs") == "15"
        assert _flag(run, "--prior") in (None, "pixels:16")
    assert _flag(by_row["res28-byol-random-50"][0], "--selection") == "random"
    assert _flag(by_row["res28-byol-random-50"][0], "--prior") is None
    assert _flag(by_row["res28-rela-50-keep-views"][0], "--switch-transition") == "keep-views"
    assert _flag(by_row["res28-rela-50-never"][0], "--switch") == "never"
    # Transfer: three priors x {never, hard} at every seed, at 16 px with the earlier settings.
    for prior, spec in (
        ("digits", f"checkpoint:resnet10:{switch_grid.digits_checkpoint(out)}"),
        ("pixels", "pixels:16"),
    ):
        for switch in ("never", "hard"):
            runs = by_row[f"transfer-{prior}-{switch}"]
            assert [run.seed for run in runs] == [0, 1, 2]
            assert all(_flag(run, "--prior") == spec for run in runs)
            assert all(_flag(run, "--decay-exclude") == "bias-norm" for run in runs)
            assert all(_flag(run, "--image-size") is None for run in runs)
    random_priors = [_flag(run, "--prior") for run in by_row["transfer-random-hard"]]
    assert random_priors == [
        f"checkpoint:resnet10:{grid.random_checkpoint(out, seed)}" for seed in (0, 1, 2)
    ]
    assert _flag(by_row["transfer-digits-hard"][0], "--switch-transition") == "hard"
    # The official weight decay, once, beside the factor row hard.
    (decay,) = by_row["decay-rela-50-hard"]
    assert _flag(decay, "--decay-exclude") == "none" and _flag(decay, "--image-size") is None


def test_the_long_half_of_the_rule_at_28_px() -> None:
    plan = switch_grid.build_switch_plan(
        grid.DEFAULT_SIZES, switch_grid.STUDY_STEPS, [3, 4, 5], best="warm-heads:300",
        features=FEATURES, parts=("res28", "res28long"), long_seeds=[4],
    )  # fmt: skip
    long = [run for run in plan if run.row.startswith("res28long-")]
    # Two rows at the long horizon's seed only, after the 15-epoch rows of their seed.
    assert sorted(run.row for run in long) == [
        switch_grid.RES28_LONG_BEST_ROW,
        switch_grid.RES28_LONG_HARD_ROW,
    ]
    assert {run.seed for run in long} == {4}
    assert plan.index(long[0]) > max(
        i for i, run in enumerate(plan) if run.seed == 4 and run.row.startswith("res28-")
    )
    transitions = {run.row: _flag(run, "--switch-transition") for run in long}
    assert transitions == {
        switch_grid.RES28_LONG_HARD_ROW: "hard",
        switch_grid.RES28_LONG_BEST_ROW: "warm-heads:300",
    }
    for run in long:
        assert _flag(run, "--epochs") == "45" and _flag(run, "--image-size") == "28"
        assert _flag(run, "--decay-exclude") == "none" and _flag(run, "--prior") == "pixels:16"
    # The verdict at 28 px reads the long rows: ahead at 15 epochs but worse at 45 keeps hard.
    records = [_record(switch_grid.RES28_HARD_ROW, s, 0.80, []) for s in range(3)]
    records += [_record("res28-rela-50-keep-views", s, 0.82 + 0.001 * s, []) for s in range(3)]
    pairs = {
        switch_grid.RES28_HARD_ROW: switch_grid.RES28_LONG_HARD_ROW,
        "res28-rela-50-keep-views": switch_grid.RES28_LONG_BEST_ROW,
    }
    without_long = switch_aggregate.default_verdict(
        switch_aggregate.summarize_switch(records), switch_grid.RES28_HARD_ROW,
        ["res28-rela-50-keep-views"], pairs,
    )  # fmt: skip
    assert without_long.endswith(f"Verdict: the default is {switch_grid.RES28_HARD_ROW}")
    assert "long horizon not measured" in without_long
    for record in records:
        record["switch_transition"] = "hard" if "hard" in record["row"] else "keep-views"
    for hard_long, best_long, verdict in (
        (0.83, 0.82, f"the default is hard ({switch_grid.RES28_HARD_ROW})"),
        (0.82, 0.83, "the default is keep-views (res28-rela-50-keep-views)"),
    ):
        verdict_text = switch_aggregate.default_verdict(
            switch_aggregate.summarize_switch(records + [
                _record(switch_grid.RES28_LONG_HARD_ROW, 0, hard_long, []),
                _record(switch_grid.RES28_LONG_BEST_ROW, 0, best_long, []),
            ]),
            switch_grid.RES28_HARD_ROW, ["res28-rela-50-keep-views"], pairs,
        )  # fmt: skip
        assert verdict_text.split("Verdict: ")[1] == verdict


def test_the_digits_prior_is_a_checkpoint_prior(tmp_path: Path) -> None:
    from rela_study.digits_prior import train_digits_prior
    from rela_train.prior.loaders import load_prior

    path = tmp_path / "digits.pt"
    note = train_digits_prior(path, epochs=1, log=lambda line: None)
    assert note["train_images"] + note["held_out_images"] == 1797
    assert 0.1 < note["held_out_accuracy"] <= 1.0  # above chance after one epoch
    prior = load_prior(f"checkpoint:resnet10:{path}")
    assert prior.dim == 256 and prior.input_size == 32
    # Seeded and skipped when present: a second call returns the same note, file untouched.
    mtime = path.stat().st_mtime_ns
    assert train_digits_prior(path, epochs=1, log=lambda line: None) == note
    assert path.stat().st_mtime_ns == mtime


def test_the_plot_of_parts_without_step_curves_is_the_accuracies_alone(tmp_path: Path) -> None:
    from PIL import Image

    records = [_record("res28-rela-50-hard", seed, 0.8 + seed / 100, []) for seed in (0, 1)]
    for record in records:
        record["step_curve"] = []
    summaries = switch_aggregate.summarize_switch(records)
    alone = switch_aggregate.plot_switch(summaries, tmp_path / "alone.png", 100)
    with_curve = switch_aggregate.plot_switch(
        switch_aggregate.summarize_switch(
            [_record("switch-a-hard", 0, 0.8, [(-1, 0.8), (99, 0.7)])]
        ),
        tmp_path / "both.png",
        100,
    )
    # One panel is narrower than the two side by side.
    assert Image.open(alone).width < Image.open(with_curve).width


def test_the_transportability_table_skips_unfinished_stores_and_keeps_what_it_computed(
    tmp_path: Path,
) -> None:
    import numpy as np
    from rela_study import transfer

    import rela_kernels as rk

    rng = np.random.default_rng(0)
    base = rng.standard_normal((500, 6)).astype(np.float32)
    values = {
        "digits": base,
        "pixels": (base @ rng.standard_normal((6, 9))).astype(np.float32),  # linear in digits
        "random": rng.standard_normal((500, 7)).astype(np.float32),  # unrelated
    }
    for prior, rows in values.items():
        path = tmp_path / "runs" / f"transfer-{prior}-never-seed0" / "prior"
        path.parent.mkdir(parents=True)
        with rk.EmbeddingStore.create_or_resume(
            path, len(rows), rows.shape[1], fingerprint="same", prior=prior, input_size=None,
            chunk_rows=100,
        ) as store:  # fmt: skip
            for start, stop in store.pending_chunks():
                if prior == "random" and start >= 200:
                    break  # still being written
                store.write_chunk(start, rows[start:stop])
    table = transfer.transportability_table(tmp_path, 0)
    assert set(table) == {"digits", "pixels"}
    assert table["digits"]["pixels"] > 0.999  # a linear map
    assert "random" not in table["digits"]  # unfinished: left out, retried next time
    cached = json.loads((tmp_path / "transportability.json").read_text())
    assert cached == {"digits->pixels@0": table["digits"]["pixels"],
                      "pixels->digits@0": table["pixels"]["digits"]}  # fmt: skip
