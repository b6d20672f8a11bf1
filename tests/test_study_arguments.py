"""The study scripts' shared command line (rela_study/arguments.py), and the clean-tree rule: a
record says whether its tree was dirty (with the diff's hash), and a full study writes no record
from a dirty tree unless --allow-dirty."""

from __future__ import annotations

import argparse
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
from rela_study import grid, records, runner  # noqa: E402
from rela_study.arguments import dirty_refusal, seed_list, study_parser  # noqa: E402


def test_seeds_are_a_count_or_a_list() -> None:
    assert seed_list("3") == [0, 1, 2] and seed_list("0,4") == [0, 4] and seed_list("4,") == [4]
    for bad in ("0", ",", "a,1", "-1", "1,-2", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="seed count >= 1"):
            seed_list(bad)


def test_both_studies_parse_the_shared_flags_alike() -> None:
    import study_rela
    import study_switch

    argv = ["--out", "o", "--seeds", "0,2", "--jobs", "3", "--epochs", "4", "--allow-dirty"]
    for parse in (study_rela.parse_args, study_switch.parse_args):
        args = parse(argv)
        assert (args.seeds, args.jobs, args.epochs, args.allow_dirty) == ([0, 2], 3, 4, True)
        for bad in (["--jobs", "0"], ["--epochs", "x"], ["--data-dir", ""]):
            with pytest.raises(SystemExit):
                parse(["--out", "o", *bad])


def test_the_environment_names_the_code_and_its_changes() -> None:
    state = common.git_state()
    assert set(state) == {"git_sha", "dirty", "diff_sha256"}
    assert state["git_sha"] == "unknown" or re.fullmatch("[0-9a-f]{40}", state["git_sha"])
    if state["dirty"]:
        assert re.fullmatch("[0-9a-f]{64}", state["diff_sha256"])
    else:
        assert state["diff_sha256"] is None
    assert {"git_sha", "dirty", "diff_sha256"} <= set(common.environment("cpu"))


def test_results_written_into_the_tree_do_not_make_it_dirty(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
            check=True, capture_output=True,
        )  # fmt: skip

    results = tmp_path / "benchmarks" / "results" / "switch.jsonl"
    results.parent.mkdir(parents=True)
    results.write_text("{}\n")
    (tmp_path / "study.py").write_text("SEEDS = 3\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    clean = common.git_state(tmp_path)
    assert clean["dirty"] is False and re.fullmatch("[0-9a-f]{40}", clean["git_sha"])
    # A study's aggregation rewrites its results file after each run: still clean.
    results.write_text('{}\n{"row": "x"}\n')
    assert common.git_state(tmp_path) == clean
    # A change to the code is not.
    (tmp_path / "study.py").write_text("SEEDS = 4\n")
    changed = common.git_state(tmp_path)
    assert changed["dirty"] is True and re.fullmatch("[0-9a-f]{64}", changed["diff_sha256"])
    results.write_text("{}\n")
    assert common.git_state(tmp_path)["diff_sha256"] == changed["diff_sha256"]


def test_a_dirty_tree_is_refused_unless_allowed_or_quick() -> None:
    parser = study_parser("test")
    dirty = {"git_sha": "a" * 40, "dirty": True, "diff_sha256": "f" * 64}
    refusal = dirty_refusal(dirty, parser.parse_args(["--out", "o"]))
    assert refusal is not None and "--allow-dirty" in refusal and "f" * 64 in refusal
    assert dirty_refusal(dirty, parser.parse_args(["--out", "o", "--allow-dirty"])) is None
    assert dirty_refusal(dirty, parser.parse_args(["--out", "o", "--quick"])) is None
    assert dirty_refusal({**dirty, "dirty": False}, parser.parse_args(["--out", "o"])) is None


FAKE_FIT = textwrap.dedent(
    """\
    #!{python}
    import json, sys
    from pathlib import Path
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({{"knn_acc": 0.5, "policy": "random"}}))
    """
)


def test_the_runner_writes_no_record_from_a_dirty_tree(tmp_path: Path) -> None:
    script = tmp_path / "fake_python"
    script.write_text(FAKE_FIT.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    plan = [r for r in grid.build_plan(tmp_path / "s", grid.QUICK_SIZES, [0]) if r.needs is None]
    plan = [r for r in plan if not r.is_pretrain][:1]
    dirty = {"git_sha": "a" * 40, "dirty": True, "diff_sha256": "f" * 64}
    logged: list[str] = []

    def study(refuse: bool) -> list[str]:
        return runner.run_study(
            plan, tmp_path / "s", study="t", jobs=1, refuse_dirty=refuse, python=str(script),
            environment=lambda: dirty, on_record=lambda: None, log=logged.append,
        )  # fmt: skip

    assert study(True) == [plan[0].run_id]
    assert records.load_records(tmp_path / "s") == [] and "not written" in logged[-1]
    assert study(False) == []  # --allow-dirty: the finished run's record, marked dirty
    (record,) = records.load_records(tmp_path / "s")
    assert record["environment"]["dirty"] is True and record["policy"] == "random"
    # That record's run had finished before: this study ran no fit for it, so it names no time.
    assert record["run_seconds"] is None and record["cpu_seconds"] is None
    assert logged[-1].startswith(f"[{plan[0].run_id}] done: kNN")
