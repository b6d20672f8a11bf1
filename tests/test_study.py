"""The ReLA study's machinery (benchmarks/study_rela.py), in seconds, without the real grid.

The runner is driven with a stand-in trainer (a script that writes the summary a finished
``rela-train fit`` writes), so plan building, resume-skip, record writing and aggregation are
checked without training; the transported prior's conversion and class subset are checked on a
random network and a tiny IDX data set.
"""

from __future__ import annotations

import json
import stat
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from rela_study import aggregate, grid, records, runner, transport  # noqa: E402
from rela_train.data.fashion_mnist import MEAN, STD, load_fashion_mnist  # noqa: E402
from rela_train.models import build_resnet  # noqa: E402
from rela_train.prior.loaders import NORMALIZATIONS, load_prior  # noqa: E402

TINY = grid.Sizes(
    train_subset=64, val_subset=32, batch_size=16, epochs=2, eval_every=1, eval_bank=32,
    probe_epochs=2, pretrain_subset=32, pretrain_epochs=1,
)  # fmt: skip
ALL_FEATURES = {"--recipe", "--probe", "--anneal"}


def _flag(run: grid.RunSpec, name: str) -> str | None:
    flags = list(run.flags)
    return flags[flags.index(name) + 1] if name in flags else None


def test_plan_rows_seeds_and_order(tmp_path):
    plan = grid.build_plan(tmp_path, TINY, [3, 5, 8], features=ALL_FEATURES)
    core = [row for row in grid.ROWS if row.core]
    ablations = [row for row in grid.ROWS if not row.core]
    assert len(plan) == 1 + 3 * len(core) + len(ablations)
    assert plan[0].is_pretrain and plan[0].needs is None
    ids = [run.run_id for run in plan]
    assert len(set(ids)) == len(ids)
    for row in core:
        assert sorted(run.seed for run in plan if run.row == row.name) == [3, 5, 8]
    for row in ablations:
        assert [run.seed for run in plan if run.row == row.name] == [3]
    users = [run for run in plan if run.needs is not None]
    assert {run.row for run in users} == {"rela-50-transported"}
    first_user = min(ids.index(run.run_id) for run in users)
    assert all(run.needs is None for run in plan[:first_user])  # they wait at the end
    checkpoint = str(grid.transported_checkpoint(tmp_path))
    assert all(_flag(run, "--prior") == f"checkpoint:resnet10:{checkpoint}" for run in users)
    random_runs = [run for run in plan if run.row == "rela-50-random"]
    assert {_flag(run, "--prior") for run in random_runs} == {
        f"checkpoint:resnet10:{grid.random_checkpoint(tmp_path, seed)}" for seed in (3, 5, 8)
    }
    selections = {run.row: _flag(run, "--selection") for run in plan if not run.is_pretrain}
    assert selections["byol-100"] is None and selections["byol-random-50"] == "random"
    assert selections["rela-50-pixels-hard"] == "hard"
    for run in plan:
        if run.prior is not None:
            head = "trainable" if run.row == "rela-50-pixels-trainable-head" else "frozen"
            assert _flag(run, "--rela-head") == head
        assert _flag(run, "--recipe") == "official"
        assert _flag(run, "--threads") == "1"
        assert _flag(run, "--seed") == str(run.seed)
        if not run.is_pretrain:
            assert _flag(run, "--probe") == "official"
            assert _flag(run, "--epochs") == str(TINY.epochs)
            budget = float(_flag(run, "--budget"))
            assert run.samples == round(budget * TINY.train_subset) * TINY.epochs
    pretrain = plan[0]
    assert _flag(pretrain, "--data-dir") == str(grid.pretrain_data_dir(tmp_path))
    assert _flag(pretrain, "--image-size") == str(TINY.pretrain_image_size)
    assert (_flag(pretrain, "--arch"), _flag(pretrain, "--width")) == ("resnet10", "32")


def test_plan_without_new_trainer_flags_and_bad_seeds(tmp_path):
    plan = grid.build_plan(tmp_path, TINY, [0], features=set())
    assert all("--recipe" not in run.flags and "--probe" not in run.flags for run in plan)
    with pytest.raises(ValueError, match="--seeds"):
        grid.build_plan(tmp_path, TINY, [], features=set())
    with pytest.raises(ValueError, match="--seeds"):
        grid.build_plan(tmp_path, TINY, [1, 1], features=set())
    longer = grid.with_overrides(TINY, 7)
    assert longer.epochs == 7 and grid.with_overrides(TINY, None) == TINY
    text = grid.format_plan(plan, TINY, 2, {plan[1].run_id})
    assert f"{len(plan)} runs" in text and "estimated time left" in text


FAKE_FIT = textwrap.dedent(
    """\
    #!{python}
    # Stands in for `python -m rela_train fit ...`: logs the call, writes a finished run's summary.
    import json, sys
    from pathlib import Path
    args = sys.argv[1:]
    calls = Path({calls!r})
    with open(calls, "a") as handle:
        handle.write(json.dumps(args) + "\\n")
    if "--help" in args:
        print("usage: rela-train fit [--recipe RECIPE] [--probe PROBE]")
        sys.exit(0)
    out = Path(args[args.index("--out") + 1])
    seed = int(args[args.index("--seed") + 1])
    if seed == 13:
        sys.exit(3)
    out.mkdir(parents=True)
    budget = float(args[args.index("--budget") + 1])
    summary = {{
        "knn_acc": 0.5 + 0.01 * seed + 0.1 * budget, "linear_acc_official": 0.6 + 0.02 * seed,
        "samples_seen": int(1000 * budget), "train_time": 10.0 + seed, "wall_time": 12.0,
        "steps": 40, "switch": "adaptive" if "--prior" in args else None,
        "switch_step": 30 if "--prior" in args else None, "switch_epoch": 1, "budget": budget,
        "policy": args[args.index("--selection") + 1] if "--selection" in args else "random",
        "evaluations": [
            {{"epoch": 0, "samples_seen": 500, "train_time": 5.0, "knn_acc": 0.4 + 0.01 * seed}},
            {{"epoch": 1, "samples_seen": 1000, "train_time": 10.0, "knn_acc": 0.5}},
        ],
    }}
    (out / "summary.json").write_text(json.dumps(summary))
    """
)


@pytest.fixture
def fake_python(tmp_path):
    calls = tmp_path / "calls.jsonl"
    script = tmp_path / "fake_python"
    script.write_text(FAKE_FIT.format(python=sys.executable, calls=str(calls)))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), calls


def _calls(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_runner_records_and_resume_skip(tmp_path, fake_python):
    python, calls = fake_python
    out = tmp_path / "study"
    plan = [
        run
        for run in grid.build_plan(out, TINY, [0, 1], features=ALL_FEATURES)
        if not run.is_pretrain and run.needs is None
    ]
    half = plan[: len(plan) // 2]
    logged: list[str] = []
    written: list[int] = []
    environment = {"device": "test"}
    failed = runner.run_study(
        half, out, study="test-study", jobs=2, python=python, environment=lambda: environment,
        on_record=lambda: written.append(1), log=logged.append,
    )  # fmt: skip
    assert failed == [] and len(written) == len(half)
    assert len(_calls(calls)) == len(half)  # one fit per run
    saved = records.load_records(out)
    assert [r["run"] for r in saved] == sorted(run.run_id for run in half)
    for record in saved:
        run = next(run for run in half if run.run_id == record["run"])
        assert record["seed"] == run.seed and record["row"] == run.row
        assert record["metrics"]["knn_acc"] == pytest.approx(
            0.5 + 0.01 * run.seed + 0.1 * float(_flag(run, "--budget"))
        )
        assert record["switch_step"] == (30 if run.prior else None)
        assert record["environment"] == environment and record["study"] == "test-study"
        assert record["policy"] == (_flag(run, "--selection") or "random")
        assert record["command"].endswith(f"--out {out / 'runs' / run.run_id}")
        assert len(record["curve"]) == 2 and record["cpu_seconds"] >= 0
    # A resumed study runs only what has no record.
    failed = runner.run_study(
        plan, out, study="test-study", jobs=2, python=python, environment=lambda: environment,
        on_record=lambda: None, log=logged.append,
    )  # fmt: skip
    fits = [call for call in _calls(calls) if "--help" not in call]
    assert failed == [] and len(fits) == len(plan)
    assert sorted(records.done_runs(out)) == sorted(run.run_id for run in plan)


def test_runner_reports_a_failed_run_and_goes_on(tmp_path, fake_python):
    python, _ = fake_python
    out = tmp_path / "study"
    plan = [
        run
        for run in grid.build_plan(out, TINY, [13, 2], features=set())
        if run.row in ("byol-100", "byol-random-50")
    ]
    logged: list[str] = []
    failed = runner.run_study(
        plan, out, study="test-study", jobs=1, python=python, environment=dict,
        on_record=lambda: None, log=logged.append,
    )  # fmt: skip
    assert sorted(failed) == ["byol-100-seed13", "byol-random-50-seed13"]
    assert records.done_runs(out) == {"byol-100-seed2", "byol-random-50-seed2"}
    assert any("exited with 3" in line for line in logged)


def test_fit_command_resumes_a_killed_run(tmp_path):
    run = grid.build_plan(tmp_path, TINY, [0], features=set())[1]
    run_dir = tmp_path / "runs" / run.run_id
    fresh = runner.fit_command("py", run, run_dir)
    assert fresh[-2:] == ["--out", str(run_dir)] and "--resume" not in fresh
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
    assert runner.fit_command("py", run, run_dir)[4:6] == ["--resume", str(run_dir)]


def test_record_writing_is_whole_or_nothing(tmp_path):
    record = {"run": "a-seed0", "row": "a", "seed": 0, "metrics": {"knn_acc": 0.5}}
    path = records.write_record(tmp_path, record)
    assert json.loads(path.read_text()) == record
    with pytest.raises(ValueError, match="'run'"):
        records.write_record(tmp_path, {"row": "b"})
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["a-seed0.json"]
    jsonl = records.write_jsonl(tmp_path / "all.jsonl", [record, {**record, "run": "b"}])
    lines = jsonl.read_text().splitlines()
    assert [json.loads(line)["run"] for line in lines] == ["a-seed0", "b"]
    (tmp_path / "records" / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        records.load_records(tmp_path)


def test_aggregation_mean_std_against_numpy(tmp_path):
    rng = np.random.default_rng(0)
    knn = {"x": rng.uniform(0.5, 0.9, 3), "y": rng.uniform(0.5, 0.9, 1)}
    recs = []
    for row, values in knn.items():
        for seed, value in enumerate(values):
            recs.append(
                {
                    "row": row, "label": f"row {row}", "seed": seed, "prior": "pixels:16",
                    "metrics": {"knn_acc": float(value), "train_time": 60.0 * (seed + 1)},
                    "switch_step": 100 + seed,
                    "curve": [{"epoch": 0, "samples_seen": 10 * (seed + 1),
                               "train_time": 1.0, "knn_acc": float(value)}],
                }
            )  # fmt: skip
    assert [s.row for s in aggregate.summarize(recs, ["y", "absent"])] == ["y", "x"]
    summaries = aggregate.summarize(recs)
    assert [s.row for s in summaries] == ["x", "y"]
    mean, std = summaries[0].metrics["knn_acc"]
    assert mean == pytest.approx(np.mean(knn["x"]))
    assert std == pytest.approx(np.std(knn["x"], ddof=1))
    assert summaries[1].metrics["knn_acc"] == (pytest.approx(knn["y"][0]), None)
    table = aggregate.format_markdown(summaries)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| row |")
    assert f"{100 * np.mean(knn['x']):.2f} ± {100 * np.std(knn['x'], ddof=1):.2f}" in lines[2]
    assert "100, 101, 102" in lines[2] and "| 1 |" in lines[3]
    xs, ys, errors = aggregate.curve_stats(summaries[0].records, "samples_seen")
    assert xs == [pytest.approx(20.0)] and ys == [pytest.approx(100 * np.mean(knn["x"]))]
    assert errors == [pytest.approx(100 * np.std(knn["x"], ddof=1))]
    png = aggregate.plot_study(summaries, tmp_path / "study.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no values"):
        aggregate.mean_std([])


def _write_idx(directory: Path, stem: str, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    (directory / stem).write_bytes(header + array.astype(np.uint8).tobytes())


def test_class_subset_keeps_only_those_classes(tmp_path):
    source = tmp_path / "fm"
    source.mkdir()
    rng = np.random.default_rng(1)
    for images_stem, labels_stem, n in (
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 40),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 20),
    ):
        _write_idx(source, images_stem, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(source, labels_stem, rng.integers(0, 10, n))
    out = transport.write_class_subset(str(source), tmp_path / "sub", (0, 1, 2, 3, 4))
    for split in ("train", "test"):
        images, labels, _ = load_fashion_mnist(source, split)
        kept_images, kept_labels, _ = load_fashion_mnist(out, split)
        keep = labels < 5
        assert 0 < int(keep.sum()) < len(labels)
        assert torch.equal(kept_labels, labels[keep])
        assert torch.equal(kept_images, images[keep])
    with pytest.raises(ValueError, match="classes"):
        transport.write_class_subset(str(source), tmp_path / "bad", (3, 12))


def test_transported_checkpoint_computes_what_the_gray_network_computes(tmp_path):
    torch.manual_seed(0)
    gray = build_resnet("resnet10", small_images=True, width=8, in_channels=1)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        gray.bn1.running_mean.uniform_(-1, 1)
        gray.bn1.running_var.uniform_(0.5, 2)
    gray.eval()
    learner = {f"byol.backbone.{k}": v for k, v in gray.state_dict().items()}
    learner.update({f"byol.target_backbone.{k}": v for k, v in gray.state_dict().items()})
    learner["probe.weight"] = torch.zeros(10, 64)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"learner": learner}, run_dir / "checkpoints" / "last.pt")
    path = transport.rgb_prior_checkpoint(run_dir, tmp_path / "prior.pt")
    prior = load_prior(f"checkpoint:resnet10:{path}")
    assert prior.dim == gray.feature_dim
    rgb = build_resnet("resnet10", small_images=True, width=8)
    rgb.load_state_dict(torch.load(path, weights_only=True), strict=False)
    rgb.eval()
    pixels = torch.rand(4, 1, 20, 20)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    with torch.no_grad():
        want = gray.bn1(gray.conv1((pixels - MEAN[0]) / STD[0]))
        got = rgb.bn1(rgb.conv1((pixels.expand(-1, 3, -1, -1) - mean) / std))
    # Exact inside; the zero padding of the border sees other constants.
    torch.testing.assert_close(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[..., 0, :], want[..., 0, :], atol=1e-3)
    (run_dir / "checkpoints" / "last.pt").unlink()
    torch.save({"learner": {"other.weight": torch.zeros(1)}}, run_dir / "checkpoints" / "last.pt")
    with pytest.raises(ValueError, match="one online backbone"):
        transport.rgb_prior_checkpoint(run_dir, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_random_prior_is_the_transported_architecture_seeded(tmp_path):
    first = transport.random_prior_checkpoint("resnet10", 16, 4, tmp_path / "a.pt")
    again = transport.random_prior_checkpoint("resnet10", 16, 4, tmp_path / "b.pt")
    other = transport.random_prior_checkpoint("resnet10", 16, 5, tmp_path / "c.pt")
    a, b, c = (torch.load(p, weights_only=True) for p in (first, again, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert a["conv1.weight"].shape == (16, 3, 3, 3)
    prior = load_prior(f"checkpoint:resnet10:{first}")
    assert prior.dim == 128 and prior.input_size == 32
