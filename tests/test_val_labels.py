"""``--val-labels``: a flat evaluation folder (ImageNet's validation layout) labelled by a file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folder import make_image_folder
from PIL import Image
from rela_train.cli import main
from rela_train.data.folder import list_images
from rela_train.data.val_labels import read_val_labels

CLASSES = ["class_0", "class_1", "class_2"]


def _flat(root: Path, n: int = 9) -> list[str]:
    """``root/ILSVRC2012_val_0000000K.JPEG`` images; returns their names in sorted order."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, n + 1)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            root / name, format="JPEG"
        )
    return names


def _read(path: Path, root: Path) -> list[int]:
    samples, _ = list_images(root)
    return read_val_labels(path, root, samples, CLASSES).tolist()


def test_the_ground_truth_layout_and_the_csv_give_the_same_labels(tmp_path: Path) -> None:
    names = _flat(tmp_path / "val")
    truth = [(k % 3) + 1 for k in range(9)]  # 1-based, in sorted file-name order
    (tmp_path / "ground_truth.txt").write_text("".join(f"{t}\n" for t in truth))
    expected = [t - 1 for t in truth]
    assert _read(tmp_path / "ground_truth.txt", tmp_path / "val") == expected
    # Class names per line, too.
    (tmp_path / "names.txt").write_text("".join(f"{CLASSES[t - 1]}\n" for t in truth))
    assert _read(tmp_path / "names.txt", tmp_path / "val") == expected
    # A CSV in any row order, image names without their extension (LOC_val_solution.csv).
    rows = [f"{Path(n).stem},{CLASSES[t - 1]} 1 2 3 4" for n, t in zip(names, truth, strict=True)]
    (tmp_path / "labels.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]))
    assert _read(tmp_path / "labels.csv", tmp_path / "val") == expected


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("gt.txt", "1\n2\n4\n1\n1\n1\n1\n1\n1\n", "gt.txt line 3: class 4 is out of range 1..3"),
        ("gt.txt", "1\n2\n", "gt.txt has 2 labels but"),
        ("gt.txt", "1\n" * 8 + "n0000\n", "gt.txt line 9: class 'n0000' is not a class"),
        ("l.csv", "ImageId,Class\nILSVRC2012_val_00000099,class_0\n", "image 'ILSVRC2012_val_0000"),
        ("l.csv", "ImageId,Class\nILSVRC2012_val_00000001,class_0\n", "8 image(s) of"),
        ("l.csv", "a,b\nILSVRC2012_val_00000001,class_9\n", "class 'class_9' is not a class"),
        ("l.csv", "a,b\nILSVRC2012_val_00000001.JPEG,class_0\nILSVRC2012_val_00000001,class_1\n",
         "labelled twice"),
    ],
)  # fmt: skip
def test_a_bad_labels_file_is_refused_in_one_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    _flat(tmp_path / "val")
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="^--val-labels: ") as error:
        _read(tmp_path / name, tmp_path / "val")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_file_and_a_nested_folder_are_refused(tmp_path: Path) -> None:
    _flat(tmp_path / "val")
    with pytest.raises(FileNotFoundError, match=r"^--val-labels: .*missing.txt does not exist"):
        _read(tmp_path / "missing.txt", tmp_path / "val")
    make_image_folder(tmp_path / "nested", classes=2, per_class=2, seed=0)
    (tmp_path / "gt.txt").write_text("1\n" * 4)
    with pytest.raises(ValueError, match="is for a flat folder"):
        _read(tmp_path / "gt.txt", tmp_path / "nested")


def test_fit_and_eval_on_a_flat_validation_folder(tmp_path: Path, capsys) -> None:
    make_image_folder(tmp_path / "train", classes=3, per_class=12, seed=0)
    _flat(tmp_path / "val")
    (tmp_path / "gt.txt").write_text("".join(f"{(k % 3) + 1}\n" for k in range(9)))
    argv = ["fit", "--preset", "synthetic-test", "--dataset", "folder", "--epochs", "1",
            "--data-dir", str(tmp_path / "train"), "--val-dir", str(tmp_path / "val"),
            "--workers", "0", "--out", str(tmp_path / "run")]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        # The training set's classes label the flat folder's images.
        assert main([*argv, "--val-labels", str(tmp_path / "gt.txt"), "--dry-run"]) == 0
        assert "evaluation on" in capsys.readouterr().out
        assert main([*argv, "--val-labels", str(tmp_path / "missing.txt")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("missing.txt does not exist or is not a file") and "\n" not in err
        assert not (tmp_path / "run").exists()
        assert main([*argv, "--val-labels", str(tmp_path / "gt.txt")]) == 0
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert 0.0 <= summary["knn_acc"] <= 1.0
        capsys.readouterr()
        assert main(["eval", str(tmp_path / "run"), "--json", "--probe", "none"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["val_images"] == 9
    finally:
        torch.set_num_threads(threads)
