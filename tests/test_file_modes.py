"""Files the project writes get 0666 less the umask, like any new file (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from rela_train.presets import get_preset
from rela_train.runs import fit

import rela_kernels as rk
from rela_kernels.atomic_io import atomic_write_text


@contextmanager
def umask_set(value: int):
    old = os.umask(value)
    threads = torch.get_num_threads()  # fit sets the thread count; leave other tests as they were
    try:
        yield value
    finally:
        os.umask(old)
        torch.set_num_threads(threads)


@pytest.fixture(params=[0o022, 0o077, 0o027])
def umask(request: pytest.FixtureRequest):
    with umask_set(request.param) as value:
        yield value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_store_transport_and_json_follow_the_umask(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask
    atomic_write_text(tmp_path / "a.json", "{}\n")
    atomic_write_text(tmp_path / "a.json", "{}\n")  # a replaced file too
    with rk.EmbeddingStore.create_or_resume(
        tmp_path / "s", 4, 2, fingerprint="fp", prior="p", input_size=None, chunk_rows=2
    ) as store:
        store.write_chunk(0, torch.randn(2, 2))
    rk.Transport(torch.zeros(2), torch.eye(2)).save(tmp_path / "transport.pt")
    written = [tmp_path / "a.json", tmp_path / "transport.pt"]
    written += [tmp_path / "s" / name for name in ("manifest.json", "embeddings.f16", ".lock")]
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(expected) for p in written}


def test_run_files_follow_the_umask(tmp_path: Path) -> None:
    cfg = get_preset("synthetic-test").replace(epochs=1, eval_every=0, probe_epochs=1)
    with umask_set(0o027):
        fit(cfg, tmp_path / "run", log=lambda _: None)
    files = [tmp_path / "run" / "checkpoints" / "last.pt"]
    files += [tmp_path / "run" / n for n in ("config.json", "summary.json", "metrics.jsonl")]
    assert {p.name: oct(mode(p)) for p in files} == {p.name: "0o640" for p in files}
