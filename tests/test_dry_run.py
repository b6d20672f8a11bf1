"""``fit --dry-run`` / ``embed --dry-run``, and every documented command planned at its world size.

Every ``rela-train``, ``python -m rela_train`` and ``torchrun ... -m rela_train`` command in the
``bash`` blocks of README.md and docs/ is extracted; ``fit`` and ``embed`` commands run with
``--dry-run --world-size W`` (W: torchrun's ``--nnodes`` x ``--nproc-per-node``), other
subcommands are parsed. Paths stand in for the documented ones: a small generated image folder
for the training and validation data, a store embedded from it, a tiny TorchScript archive, a
trained synthetic run for ``--resume``, fresh directories for ``--out``. Priors whose package is
not installed (``open_clip:``, ``timm:``) become ``pixels:8``.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
import shlex
import struct
import warnings
from pathlib import Path

import pytest
import torch
from image_folder import make_image_folder
from rela_train.build import adapt_batch_to_world
from rela_train.cli import build_parser, main
from rela_train.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
START = re.compile(r"^(?:\S*python3?\s+-m\s+rela_train|rela-train|torchrun)\s")


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command line)`` of every rela-train command in a bash block of the pages."""
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        in_bash, i = False, 0
        while i < len(lines):
            line = lines[i].strip()
            if line.startswith("```"):
                in_bash = not in_bash and line[3:].strip() in ("bash", "sh", "shell")
                i += 1
                continue
            if in_bash and START.match(line):
                start, text = i, line
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1] + " " + lines[i].strip()
                found.append((f"{page.relative_to(ROOT)}:{start + 1}", text))
            i += 1
    return found


COMMANDS = documented_commands()


def split(text: str) -> tuple[int, list[str]]:
    """``(world size, rela-train argv)`` of a documented command line."""
    words = shlex.split(text, comments=True)
    if words[0] != "torchrun":
        at = words.index("rela_train") + 1 if "rela_train" in words else 1
        return 1, words[at:]
    nodes, per_node, i = 1, 1, 1
    while words[i] != "-m":
        flag, value = words[i], words[i + 1] if i + 1 < len(words) else ""
        if flag in ("--nnodes",):
            nodes = int(value.split(":")[-1])
        if flag in ("--nproc-per-node", "--nproc_per_node"):
            per_node = int(value)
        i += 1
    assert words[i + 1] == "rela_train", text
    return nodes * per_node, words[i + 2 :]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stand-ins")
    paths = {
        "train": make_image_folder(root / "train", classes=4, per_class=40, seed=0),
        "val": make_image_folder(root / "val", classes=4, per_class=3, seed=1),
        "store": root / "store",
        "archive": root / "prior.pt",
        "run": root / "run",
        "idx": root / "fashion-mnist",
        "flat-val": root / "flat-val",
        "val-labels": root / "LOC_val_solution.csv",
        "root": root,
    }
    # ImageNet's validation layout: one flat folder, classes in a CSV.
    rows = ["ImageId,PredictionString"]
    for image in sorted(paths["val"].rglob("img_*")):
        paths["flat-val"].mkdir(exist_ok=True)
        name = f"{image.parent.name}_{image.name}"
        (paths["flat-val"] / name).write_bytes(image.read_bytes())
        rows.append(f"{name},{image.parent.name} 1 2 3 4")
    paths["val-labels"].write_text("\n".join(rows) + "\n")
    paths["idx"].mkdir()
    for split, n in (("train", 192), ("test", 64)):
        _write_idx(paths["idx"], split, n)
    threads = torch.get_num_threads()
    try:
        assert main(["embed", "--data-dir", str(paths["train"]), "--prior", "pixels:8", "--out",
                     str(paths["store"]), "--no-progress", "--workers", "0"]) == 0  # fmt: skip
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; priors still ship it
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.script(
                torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            ).save(str(paths["archive"]))
        assert main(["fit", "--preset", "synthetic-test", "--epochs", "1",
                     "--out", str(paths["run"])]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return paths


def _write_idx(directory: Path, split: str, n: int) -> None:
    """Fashion-MNIST's four IDX files, with random 28 x 28 images and labels."""
    prefix = "train" if split == "train" else "t10k"
    g = torch.Generator().manual_seed(len(split))
    arrays = (
        (f"{prefix}-images-idx3-ubyte.gz", 0x803, torch.randint(0, 256, (n, 28, 28), generator=g)),
        (f"{prefix}-labels-idx1-ubyte.gz", 0x801, torch.randint(0, 10, (n,), generator=g)),
    )
    for name, magic, array in arrays:
        header = struct.pack(">I", magic) + struct.pack(f">{array.dim()}I", *array.shape)
        with gzip.open(directory / name, "wb") as handle:
            handle.write(header + array.to(torch.uint8).numpy().tobytes())


def stand_in_argv(argv: list[str], paths: dict[str, Path], index: int) -> list[str]:
    """``argv`` with every documented path or unavailable prior replaced by its stand-in."""
    out, i = [], 0
    command = argv[0]
    while i < len(argv):
        word = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if word in ("--data-dir", "--data") and value is not None:
            out += [word, str(paths["train"])]
        elif word == "--val-dir":  # a flat folder where a labels file names its classes
            out += [word, str(paths["flat-val" if "--val-labels" in argv else "val"])]
        elif word == "--val-labels":
            out += [word, str(paths["val-labels"])]
        elif word == "--prior-store":
            out += [word, str(paths["store"])]
        elif word == "--resume" and value != "auto":  # a run directory (auto: a mode, kept)
            out += [word, str(paths["run"])]
        elif word == "--out" and value is not None:
            out += [word, str(paths["root"] / f"out-{index}")]
        elif word == "--prior" and value is not None:
            kind = value.split(":")[0]
            if kind == "torchscript":
                value = f"torchscript:{paths['archive']}"
            elif kind in ("open_clip", "timm") and importlib.util.find_spec(kind) is None:
                value = "pixels:8"
            out += [word, value]
        else:
            out.append(word)
            i += 1
            continue
        i += 2
    preset = out[out.index("--preset") + 1] if "--preset" in out else ""
    if command == "fit" and preset.startswith("fashion-mnist") and "--data-dir" not in out:
        out += ["--data-dir", str(paths["idx"])]  # instead of the default (Debian's) location
    return out


def test_the_pages_document_commands_at_several_world_sizes() -> None:
    worlds = {split(text)[0] for _, text in COMMANDS}
    subcommands = {split(text)[1][0] for _, text in COMMANDS}
    assert len(COMMANDS) >= 12 and {1, 8, 32} <= worlds and {"fit", "embed"} <= subcommands


@pytest.mark.parametrize("where, text", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command(where: str, text: str, stand_ins, capsys) -> None:
    world, argv = split(text)
    argv = stand_in_argv(argv, stand_ins, COMMANDS.index((where, text)))
    if argv[0] not in ("fit", "embed") or "--verify" in argv:
        build_parser().parse_args(argv)  # eval, report, transportability: the flags parse
        return
    code = main([*argv, "--dry-run", "--world-size", str(world)])
    out, err = capsys.readouterr()
    assert code == 0, f"{where}: {text}\n{err}"
    assert f"{world} rank(s)" in out and "dry run: every check passed" in out, out
    for flag in ("--out",):
        if flag in argv:
            assert not Path(argv[argv.index(flag) + 1]).exists(), "a dry run created --out"


def test_the_imagenet_preset_adapts_its_per_rank_batch() -> None:
    preset = get_preset("imagenet-r50-byol").replace(data_dir="/d", val_dir="/v")
    assert preset.batch_size == 256 and preset.global_batch == 4096
    for world, batch in ((8, 256), (16, 256), (32, 128), (64, 64), (12, 256), (4096, 256)):
        adapted, note = adapt_batch_to_world(preset, world)
        assert adapted.batch_size == batch, world
        assert (note is None) == (batch == 256)
    # 4096 is not divisible by 3; 1 image per rank on 4096 ranks is too few for BatchNorm.
    for world in (3, 4096):
        unchanged, note = adapt_batch_to_world(preset, world)
        assert unchanged.batch_size == 256 and note is None
    adapted, note = adapt_batch_to_world(preset, 32)
    assert "128 per rank x 1 micro-batch" in note


def test_dry_run_reports_what_a_start_reports_and_writes_nothing(
    stand_ins, tmp_path: Path, capsys
) -> None:
    base = ["fit", "--preset", "imagenet-r50-byol", "--data-dir", str(stand_ins["train"]),
            "--val-dir", str(stand_ins["val"]), "--out", str(tmp_path / "run")]  # fmt: skip
    # A global batch no per-rank batch can reach: the start's own line.
    assert main([*base, "--dry-run", "--world-size", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "rela-train fit: error: --global-batch: 4096 images per step is not a multiple of "
        "--batch-size x world size = 256 x 3 = 768"
    )
    # An explicit --batch-size is the user's: it is not adapted.
    assert main([*base, "--batch-size", "256", "--dry-run", "--world-size", "32"]) == 2
    assert "256 x 32 = 8192" in capsys.readouterr().err
    # A missing folder, a store made for other data.
    missing = [*base[:4], str(tmp_path / "nowhere"), *base[5:]]
    assert main([*missing, "--dry-run"]) == 2
    assert "nowhere" in capsys.readouterr().err
    other = make_image_folder(tmp_path / "other", classes=2, per_class=40, seed=3)
    wrong = [*base[:4], str(other), *base[5:], "--prior-store", str(stand_ins["store"])]
    assert main([*wrong, "--dry-run"]) == 2
    assert "--prior-store: the embedding store at" in capsys.readouterr().err
    # --world-size belongs to --dry-run; under torchrun the two must agree.
    assert main([*base, "--world-size", "8"]) == 2
    assert "--world-size: only with --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dry_run_under_torchrun_reads_the_world_size(
    stand_ins, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["fit", "--preset", "imagenet-r50-byol", "--data-dir", str(stand_ins["train"]),
            "--val-dir", str(stand_ins["val"]), "--out", str(tmp_path / "run"),
            "--prior-store", str(stand_ins["store"]), "--budget", "0.5"]  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "32")
    monkeypatch.setenv("RANK", "0")
    assert main([*base, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "32 rank(s)" in out and "128 per rank x 1 micro-batch(es)" in out
    assert "transition hard" in out  # auto on an image folder
    assert "160 x 192 float16 rows" in out
    assert main([*base, "--dry-run", "--world-size", "8"]) == 2
    assert "torchrun started 32 ranks" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "5")  # one plan per job: rank 0's
    assert main([*base, "--dry-run"]) == 0 and capsys.readouterr().out == ""


def test_embed_dry_run_plans_chunks_per_rank(stand_ins, tmp_path: Path, capsys) -> None:
    argv = ["embed", "--data-dir", str(stand_ins["train"]), "--prior", "pixels:8"]
    assert main([*argv, "--out", str(tmp_path / "s"), "--dry-run", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "new store" in out and "4 rank(s)" in out and not (tmp_path / "s").exists()
    assert main([*argv, "--out", str(stand_ins["store"]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "existing store, complete" in out
    assert "PCA whitening to 159 dimensions" in out  # min(256, D = 192, N - 1 = 159)
    other = ["embed", "--data-dir", str(stand_ins["train"]), "--prior", "pixels:4"]
    assert main([*other, "--out", str(stand_ins["store"]), "--dry-run"]) == 2
    assert "was made with prior" in capsys.readouterr().err
    too_wide = [*argv, "--out", str(tmp_path / "s"), "--dim", "500", "--dry-run"]
    assert main(too_wide) == 2
    assert "dim 500 is larger than the prior's embedding width 192" in capsys.readouterr().err
    bad = ["embed", "--data-dir", str(stand_ins["train"]), "--prior", "torchscript:/nowhere.pt"]
    assert main([*bad, "--out", str(tmp_path / "s"), "--dry-run"]) == 2
    assert "/nowhere.pt does not exist" in capsys.readouterr().err


def test_dry_run_refuses_what_a_start_refuses_on_a_run_directory(stand_ins, capsys) -> None:
    run = str(stand_ins["run"])  # a trained run: a new start there is refused, a resume planned
    new = ["fit", "--preset", "synthetic-test", "--out", run]
    assert main([*new, "--dry-run"]) == 2
    assert main(new) == 2  # the real start, for the same line
    planned, started = capsys.readouterr().err.strip().splitlines()
    assert planned == started and "already holds a run; continue it with --resume" in planned
    assert main(["fit", "--resume", run, "--dry-run", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "resume" in out and "4 rank(s)" in out and "checkpoint of 1 rank(s)" in out
    # 16 images per step cannot be split over 3 ranks: the resume's own refusal.
    assert main(["fit", "--resume", run, "--dry-run", "--world-size", "3"]) == 2
    assert "--resume: the checkpoint in" in capsys.readouterr().err
