"""Labels of a flat evaluation folder (``--val-labels FILE``), as ImageNet's validation set ships.

ILSVRC-2012's validation images sit in one directory (``ILSVRC2012_val_00000001.JPEG`` ...), with
their classes in a separate file. Two forms are read, each mapped onto the *training* folder's
classes (its sorted class-folder names), so that a label means the same class in both:

* a CSV file (``.csv``): a header line, then one row per image: the image's file name (with or
  without its extension, or its path relative to the folder) and its class. The class is a
  training class name (``n01440764``) or, as in ``LOC_val_solution.csv``, a field whose first
  word is that name (``n01440764 x y x y``).
* any other file: one label per line, the i-th line for the i-th image in sorted file-name order
  (the layout of ``ILSVRC2012_validation_ground_truth.txt``). A label is a training class name, or
  an integer from 1 to the number of classes: a 1-based position in the sorted class list.

Every image must have exactly one label; a bad file is refused in one line naming the flag, the
line and what is wrong.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from rela_train.data.folder import Sample

__all__ = ["FLAG", "read_val_labels"]

FLAG = "--val-labels"


def read_val_labels(
    path: str | os.PathLike[str], root: Path, samples: Sequence[Sample], classes: Sequence[str]
) -> torch.Tensor:
    """int64 labels ``[len(samples)]`` of the flat folder ``root`` from the file ``path``,
    as indices into ``classes`` (the training set's)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{FLAG}: {path} does not exist or is not a file")
    nested = [s.path for s in samples if "/" in s.path]
    if nested:
        raise ValueError(
            f"{FLAG}: {root} holds images in subfolders ({nested[0]}); --val-labels is for a "
            "flat folder (a folder of class subfolders needs no labels file)"
        )
    if not classes:
        raise ValueError(f"{FLAG}: the training folder has no class subfolders to label with")
    index = {name: i for i, name in enumerate(classes)}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{FLAG}: cannot read {path}: {error}") from error
    if path.suffix.lower() == ".csv":
        return _from_csv(path, text, root, samples, index)
    return _from_lines(path, text, root, samples, index, len(classes))


def _class(value: str, where: str, index: dict[str, int], count: int, numbers: bool) -> int:
    word = value.split()[0] if value.split() else ""
    if word in index:
        return index[word]
    if numbers and word.lstrip("-").isdigit():
        number = int(word)
        if not 1 <= number <= count:
            raise ValueError(
                f"{FLAG}: {where}: class {number} is out of range 1..{count} (the training set's "
                "classes in sorted order)"
            )
        return number - 1
    raise ValueError(
        f"{FLAG}: {where}: class {word!r} is not a class of the training set ({count} classes, "
        f"e.g. {next(iter(index))!r})"
    )


def _from_lines(path, text, root, samples, index, count) -> torch.Tensor:
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) != len(samples):
        raise ValueError(
            f"{FLAG}: {path} has {len(lines)} labels but {root} holds {len(samples)} images (one "
            "label per line, for the images in sorted file-name order)"
        )
    labels = [_class(v, f"{path.name} line {n}", index, count, True) for n, v in lines]
    return torch.tensor(labels, dtype=torch.int64)


def _from_csv(path, text, root, samples, index) -> torch.Tensor:
    position: dict[str, int] = {}
    for i, sample in enumerate(samples):
        position[sample.path] = i
        position.setdefault(Path(sample.path).stem, i)
    labels = [-1] * len(samples)
    rows = list(csv.reader(text.splitlines()))
    for n, row in enumerate(rows[1:], 2):  # the first line is the header
        if not row or not any(cell.strip() for cell in row):
            continue
        where = f"{path.name} line {n}"
        if len(row) < 2:
            raise ValueError(f"{FLAG}: {where}: expected IMAGE,CLASS, got {','.join(row)!r}")
        name = row[0].strip()
        if name not in position:
            raise ValueError(f"{FLAG}: {where}: image {name!r} is not in {root}")
        i = position[name]
        if labels[i] != -1:
            raise ValueError(f"{FLAG}: {where}: image {name!r} is labelled twice")
        labels[i] = _class(row[1].strip(), where, index, len(index), False)
    missing = [samples[i].path for i, label in enumerate(labels) if label == -1]
    if missing:
        raise ValueError(
            f"{FLAG}: {len(missing)} image(s) of {root} have no label in {path}, e.g. {missing[0]}"
        )
    return torch.tensor(labels, dtype=torch.int64)
