"""Test session setup.

Triton kernels run on CPU tensors under the interpreter; the flag must be set before triton is
imported anywhere, so it is set here, first.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rela_kernels as rk  # noqa: E402


def usable_backends() -> list[str]:
    """Backends that run on CPU tensors in this session (reference always)."""
    status = rk.backends.available()
    names = ["reference"]
    if status["cpu"].usable:
        names.append("cpu")
    if status["triton"].usable and rk.backends.interpreter_enabled():
        names.append("triton")
    return names


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh, differently seeded generator per test: inputs are new on every run."""
    g = torch.Generator()
    g.seed()
    return g
