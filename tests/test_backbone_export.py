"""Backbone files: `export` of a finished or interrupted run, `eval --backbone`, `fit
--init-backbone`, and the one-line refusals of bad input (which change nothing)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from rela_train import cli
from rela_train.backbone_io import backbone_state, infer_resnet, load_backbone_file
from rela_train.checkpoint import load_checkpoint
from rela_train.engine import Hooks, Trainer
from rela_train.models import build_resnet
from rela_train.presets import get_preset
from rela_train.runs import fit

# safetensors comes with the [train] extra; a machine without it (a bare GPU image) skips these.
safetensors_torch = pytest.importorskip("safetensors.torch")
load_file, save_file = safetensors_torch.load_file, safetensors_torch.save_file


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config(**changes):
    return get_preset("synthetic-test").replace(**changes)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    result = fit(config(), run, log=lambda _: None, preset="synthetic-test")
    assert result.status == "finished"
    return run


def online_backbone(run: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run)
    return {
        k[len("byol.backbone.") :]: v
        for k, v in state["learner"].items()
        if k.startswith("byol.backbone.")
    }


def files_in(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_export_writes_the_bare_online_backbone_and_its_sidecar(
    finished_run: Path, tmp_path: Path, capsys, fmt: str
) -> None:
    out = tmp_path / f"backbone.{fmt}"
    code, stdout, err = run_cli(capsys, "export", finished_run, "--out", out, "--format", fmt)
    assert code == 0, err
    assert stdout.count("\n") == 1 and "not a torchvision model" in stdout
    if fmt == "safetensors":
        state = load_file(out)
    else:
        state = torch.load(out, weights_only=True)  # no pickled objects, only tensors
    want = online_backbone(finished_run)
    assert sorted(state) == sorted(want)  # the net's own keys: no prefixes, no heads
    assert all(torch.equal(state[k], want[k]) for k in want)
    # It is exactly our net's state dict: loads strictly into a fresh backbone of the run.
    spec = infer_resnet(state, "test")
    assert (spec.arch, spec.width, spec.small_images) == ("resnet10", 4, True)
    spec.build().load_state_dict(state, strict=True)
    sidecar = json.loads((tmp_path / f"backbone.{fmt}.json").read_text())
    summary = json.loads((finished_run / "summary.json").read_text())
    assert sidecar["arch"] == "resnet10" and sidecar["stem"] == "small" and sidecar["width"] == 4
    assert (
        sidecar["torchvision_compatible"] is False
        and "small-image stem" in (sidecar["not_torchvision"])
    )
    assert sidecar["input"] == {
        "size": 12,
        "normalisation": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "pixels": "RGB scaled to [0, 1], then (x - mean) / std per channel",
    }
    run = sidecar["run"]
    assert run["preset"] == "synthetic-test" and run["finished"] is True
    assert run["data_fingerprint"].startswith("synthetic:train:n=256")
    assert (run["epochs"], run["epochs_done"], run["budget"], run["prior"]) == (2, 2, 1.0, None)
    assert run["evaluation"]["knn_acc"] == summary["knn_acc"]
    assert run["evaluation"]["linear_acc"] == summary["linear_acc"]
    assert run["git_sha"] and run["config"]["arch"] == "resnet10"


def test_backbone_state_strips_wrapper_prefixes() -> None:
    net = build_resnet("resnet10", small_images=True, width=4)
    wrapped = {f"module.byol.backbone._orig_mod.{k}": v for k, v in net.state_dict().items()}
    wrapped["module.byol.projector.0.weight"] = torch.zeros(2, 2)
    bare = backbone_state(wrapped, "byol.backbone.")
    assert list(bare) == list(net.state_dict())


def test_eval_backbone_repeats_the_runs_own_evaluation(
    finished_run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "backbone.safetensors"
    assert run_cli(capsys, "export", finished_run, "--out", out)[0] == 0
    code, stdout, err = run_cli(capsys, "eval", "--backbone", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    summary = json.loads((finished_run / "summary.json").read_text())
    # The same images, protocol and weights: the same kNN and probe, to the image.
    assert result["knn_acc"] == summary["knn_acc"]
    assert result["linear_acc"] == summary["linear_acc"]
    assert (result["arch"], result["stem"], result["image_size"]) == ("resnet10", "small", 12)


def test_init_backbone_reproduces_the_original_knn(
    finished_run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "backbone.safetensors"
    assert run_cli(capsys, "export", finished_run, "--out", out)[0] == 0
    summary = json.loads((finished_run / "summary.json").read_text())
    exported = load_file(out)
    # A new run of the same data and seed, started from the file instead of its initialisation.
    trainer = Trainer(config(init_backbone=str(out)), tmp_path / "warm", log=lambda _: None)
    byol = trainer.learner.byol
    for backbone in (byol.backbone, byol.target_backbone):
        state = backbone.state_dict()
        assert all(torch.equal(state[k], exported[k]) for k in exported)
    # Before any step, the run's own final evaluation gives the original run's kNN.
    assert trainer.evaluate(final=True)["knn_acc"] == summary["knn_acc"]
    # And it trains from there, recording where it started.
    assert trainer.run().status == "finished"
    saved = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert saved["init_backbone"] == str(out)


def test_export_of_an_interrupted_run_takes_its_latest_checkpoint(tmp_path: Path, capsys) -> None:
    hooks = Hooks(on_epoch_end=lambda trainer: trainer.request_stop())
    run = tmp_path / "run"
    result = fit(config(), run, hooks=hooks, log=lambda _: None)
    assert result.status == "interrupted"
    out = tmp_path / "b.safetensors"
    code, stdout, err = run_cli(capsys, "export", run, "--out", out)
    assert code == 0, err
    assert "interrupted run, after epoch 1" in stdout
    sidecar = json.loads((tmp_path / "b.safetensors.json").read_text())
    assert sidecar["run"]["finished"] is False and sidecar["run"]["epochs_done"] == 1
    assert sidecar["run"]["evaluation"]["final"] is False
    assert sidecar["run"]["evaluation"]["knn_acc"] is not None
    want = online_backbone(run)
    assert all(torch.equal(load_file(out)[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written or changed
# ------------------------------------------------------------------------------------------------


def assert_one_line(code: int, stdout: str, err: str, *needles: str) -> None:
    assert code == 2 and stdout == "", (code, stdout, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_export_refuses_a_run_without_checkpoint(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config().to_json())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli(capsys, "export", run, "--out", out_dir / "b.safetensors")
    assert_one_line(*result, "expected a run directory with a checkpoint", "last.pt")
    assert list(out_dir.iterdir()) == [] and sorted(p.name for p in run.iterdir()) == [
        "config.json"
    ]


def test_export_refuses_an_output_it_cannot_or_must_not_write(
    finished_run: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = files_in(finished_run / "checkpoints")
    missing = tmp_path / "no" / "such" / "dir" / "b.safetensors"
    result = run_cli(capsys, "export", finished_run, "--out", missing)
    assert_one_line(*result, "expected a file in an existing directory", "does not exist")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = run_cli(capsys, "export", finished_run, "--out", a_file / "b.safetensors")
    assert_one_line(*result, "is not a directory")
    existing = tmp_path / "b.safetensors"
    existing.write_bytes(b"keep me")
    result = run_cli(capsys, "export", finished_run, "--out", existing)
    assert_one_line(*result, "pass --force", "got the existing")
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "b.safetensors.json").exists()
    # An unwritable directory (root writes anywhere, so the permission check is simulated).
    real_access = __import__("os").access
    monkeypatch.setattr(
        "rela_train.export.os.access",
        lambda path, mode: False if Path(path) == tmp_path / "ro" else real_access(path, mode),
    )
    (tmp_path / "ro").mkdir()
    result = run_cli(capsys, "export", finished_run, "--out", tmp_path / "ro" / "b.safetensors")
    assert_one_line(*result, "is not writable")
    assert list((tmp_path / "ro").iterdir()) == []
    monkeypatch.undo()
    # --force replaces both files.
    code, _, err = run_cli(capsys, "export", finished_run, "--out", existing, "--force")
    assert code == 0, err
    assert load_file(existing) and (tmp_path / "b.safetensors.json").is_file()
    assert files_in(finished_run / "checkpoints") == before


def write_pickle_payload(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with path.open("wb") as handle:
        pickle.dump({"conv1.weight": Payload()}, handle)


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say) for a resnet10 / small stem / width 4 backbone."""
    good = build_resnet("resnet10", small_images=True, width=4).state_dict()
    foreign = dict(good, **{"projector.0.weight": torch.zeros(3, 3)})
    save_file(foreign, tmp_path / "foreign.safetensors")
    wide = build_resnet("resnet10", small_images=True, width=8).state_dict()
    torch.save(wide, tmp_path / "wide.pt")
    marker = tmp_path / "payload-ran"
    write_pickle_payload(tmp_path / "pickle.pt", marker)
    save_file(good, tmp_path / "whole.safetensors")
    whole = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    return {
        "truncated": (tmp_path / "truncated.safetensors", "expected a valid safetensors file"),
        "junk": (tmp_path / "junk.pt", "the weights-only loader refuses"),
        "foreign": (tmp_path / "foreign.safetensors", "foreign key 'projector.0.weight'"),
        "shapes": (tmp_path / "wide.pt", "got shape (8, 3, 3, 3) in the file"),
        "pickle": (tmp_path / "pickle.pt", "refused without unpickling"),
    }


@pytest.mark.parametrize("kind", ["foreign", "shapes", "pickle"])
def test_fit_init_backbone_refuses_a_bad_file_before_creating_the_run(
    tmp_path: Path, capsys, kind: str
) -> None:
    path, needle = bad_files(tmp_path)[kind]
    run = tmp_path / "run"
    result = run_cli(
        capsys, "fit", "--preset", "synthetic-test", "--out", run, "--init-backbone", path
    )
    assert_one_line(*result, "--init-backbone", needle)
    if kind == "shapes":
        assert "expected key 'conv1.weight' of shape (4, 3, 3, 3)" in result[2]
    assert not run.exists()
    assert not (tmp_path / "payload-ran").exists()  # the pickle was never run


@pytest.mark.parametrize("kind", ["foreign", "pickle", "truncated", "junk"])
def test_eval_backbone_refuses_a_bad_file(tmp_path: Path, capsys, kind: str) -> None:
    path, needle = bad_files(tmp_path)[kind]
    before = files_in(tmp_path)
    result = run_cli(capsys, "eval", "--backbone", path, "--dataset", "synthetic")
    assert_one_line(*result, "--backbone", needle)
    assert files_in(tmp_path) == before
    assert not (tmp_path / "payload-ran").exists()


def test_load_refuses_a_pickle_of_plain_non_tensor_values(tmp_path: Path) -> None:
    torch.save({"conv1.weight": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="got list under key 'conv1.weight'"):
        load_backbone_file(tmp_path / "list.pt", "--backbone")


def test_eval_backbone_reads_a_torchvision_format_state_dict(tmp_path: Path, capsys) -> None:
    # torchvision's layout: a standard stem, width 64, with its classifier and a DDP prefix.
    net = build_resnet("resnet18", num_classes=10)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "tv.pth")
    code, stdout, err = run_cli(
        capsys, "eval", "--backbone", tmp_path / "tv.pth", "--dataset", "synthetic",
        "--image-size", "32", "--probe", "none", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    assert (result["arch"], result["stem"], result["width"]) == ("resnet18", "standard", 64)
    assert 0.0 <= result["knn_acc"] <= 1.0 and result["linear_acc"] is None
    assert (result["train_images"], result["val_images"]) == (256, 128)


def docs_loader() -> dict:
    """The plain-PyTorch ResNet of docs/backbone.md ("Other stems and widths"), defined from the
    page itself (its definitions only: the block's tiny run and file are left out)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "backbone.md").read_text()
    block = next(b for b in page.split("```python\n")[1:] if "class Backbone" in b)
    code = block.split("```")[0]
    definitions = code[code.index("BLOCKS = ") : code.index("with open(")]
    namespace: dict = {}
    exec("import torch\nfrom torch import nn\n" + definitions, namespace)
    return namespace


@pytest.mark.parametrize(
    "arch, width, small, channels",
    [("resnet10", 4, True, 3), ("resnet18", 8, False, 3), ("resnet34", 4, True, 1),
     ("resnet50", 8, False, 3), ("resnet50", 4, True, 3)],
)  # fmt: skip
def test_the_docs_plain_pytorch_loader_gives_our_features(
    arch: str, width: int, small: bool, channels: int
) -> None:
    ours = build_resnet(arch, small_images=small, width=width, in_channels=channels)
    with torch.no_grad():  # non-trivial running statistics, as after training
        for module in ours.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    ours.eval()
    namespace = docs_loader()
    theirs = namespace["Backbone"](arch, width, "small" if small else "standard", channels)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    x = torch.randn(2, channels, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))


@pytest.mark.parametrize("text", ["[1, 2]", '{"format": "other"}', "{not json"])
def test_eval_backbone_refuses_a_damaged_sidecar(
    finished_run: Path, tmp_path: Path, capsys, text: str
) -> None:
    out = tmp_path / "b.safetensors"
    assert run_cli(capsys, "export", finished_run, "--out", out)[0] == 0
    (tmp_path / "b.safetensors.json").write_text(text)
    assert_one_line(*run_cli(capsys, "eval", "--backbone", out), "--backbone: expected")


def test_a_resumed_init_backbone_run_does_not_read_the_file_again(tmp_path: Path) -> None:
    out = tmp_path / "start.safetensors"
    net = build_resnet("resnet10", small_images=True, width=4)
    save_file(dict(net.state_dict()), out)
    hooks = Hooks(on_epoch_end=lambda trainer: trainer.request_stop())
    run = tmp_path / "run"
    assert fit(config(init_backbone=str(out)), run, hooks=hooks, log=lambda _: None).status == (
        "interrupted"
    )
    out.unlink()  # the weights are in the checkpoint now
    assert fit(config(), run, resume=True, log=lambda _: None).status == "finished"
