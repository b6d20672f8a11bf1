"""One checkpoint path (``checkpoint_path``) and one loader: a tool reading only some parts of a
checkpoint (``load_checkpoint(path, parts=...)``) gets them through the same safe load."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from rela_train.checkpoint import checkpoint_path, load_checkpoint


def test_parts_of_a_checkpoint_through_the_safe_loader(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path / "run")
    assert path == tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save({"learner": {"w": torch.ones(2)}, "other": 1}, path)
    assert set(load_checkpoint(tmp_path / "run", parts=("learner",))) == {"learner"}
    with pytest.raises(ValueError, match="with optimizer"):
        load_checkpoint(path, parts=("learner", "optimizer"))
    with pytest.raises(ValueError, match="no rela-train-checkpoint"):
        load_checkpoint(path)  # the whole checkpoint is checked when no parts are named


class _Code:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_part_is_never_unpickled_from_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"learner": _Code()}))
    with pytest.raises(ValueError, match="refused without running"):
        load_checkpoint(path, parts=("learner",))
