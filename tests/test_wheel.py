"""The package as a user installs it: ``python -m build --no-isolation`` makes a wheel holding the
compiled extension; installed into an empty directory, it imports and runs a compiled op from
outside the source tree.

Slow: it compiles the C++ extension once (CPU kernels only, ``RELA_BUILD_CUDA=0``); see
docs/benchmarks.md for what it costs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from: the tracked sources, without any build output.
SOURCES = ("setup.py", "pyproject.toml", "README.md", "csrc", "rela_kernels", "python")
IGNORE = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "*.pyc")

CHECK = """
import importlib.util
import sys
from pathlib import Path

import torch
import rela_kernels as rk
import rela_train

site = Path(sys.argv[1]).resolve()
extension = importlib.util.find_spec("rela_kernels._C").origin  # the compiled kernels
for path in (rk.__file__, rela_train.__file__, extension):
    assert Path(path).resolve().is_relative_to(site), path
assert rk.backends.available()["cpu"].usable, rk.backends.available()
t = rk.Transport(mean=torch.randn(24), matrix=torch.randn(24, 8))
z, p = torch.randn(16, 8), torch.randn(16, 24)
got = rk.transported_cosine_loss(z, p, t, backend="cpu")
want = rk.transported_cosine_loss(z, p, t, backend="reference")
torch.testing.assert_close(got, want)
print("ok", rk.__file__)
"""


@pytest.mark.slow
def test_the_wheel_installs_and_runs_outside_the_source_tree(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="`make install` installs build")
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=IGNORE)
        else:
            shutil.copy2(source, src / name)
    env = {**os.environ, "RELA_BUILD_CUDA": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(dist)],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("rela_kernels-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert any(n.startswith("rela_kernels/_C") and n.endswith(".so") for n in names), names
    assert "rela_train/cli.py" in names
    assert metadata["License-Expression"] == "Apache-2.0"  # the SPDX form

    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RELA_BACKEND")}
    ran = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)],
        cwd=elsewhere,
        env={**env, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.startswith("ok ")
