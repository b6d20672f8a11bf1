"""Setup shared by every test module.

Triton kernels run on CPU tensors under the interpreter only where no CUDA device exists: with a
device, the Triton backend must be the kernels compiled for it (the interpreter would run them on
the host and prove nothing about the GPU path). The flag must be set before triton is imported
anywhere, so it is decided here, first. ``pytest -m cuda`` selects the tests that need a device;
without one they are skipped with the reason.
"""

import os


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")
if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rela_kernels as rk  # noqa: E402

NO_CUDA_REASON = "needs a CUDA device (torch.cuda.is_available() is False)"


def usable_backends() -> list[str]:
    """Backends that run on CPU tensors on this machine (reference always)."""
    status = rk.backends.available()
    names = ["reference"]
    if status["cpu"].usable:
        names.append("cpu")
    if status["triton"].usable and rk.backends.interpreter_enabled():
        names.append("triton")
    return names


def pytest_collection_finish(session: pytest.Session) -> None:
    """On a CUDA machine no test module may turn the interpreter on while being collected: every
    Triton kernel compiled afterwards in the process (torch.compile's included) and every child
    process would run interpreted on the host, and the GPU tests would fail or prove nothing."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != _INTERPRET_AT_START:
        raise pytest.UsageError(
            "TRITON_INTERPRET was set while collecting the tests on a CUDA machine: only "
            "tests/conftest.py decides it, and only where no CUDA device exists"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test marked ``cuda`` is skipped, with the reason, on a machine without a device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh, differently seeded generator per test: inputs are new on every run."""
    g = torch.Generator()
    g.seed()
    return g


# The GPU backends every CUDA op test runs on. Where a device exists both must work: the CUDA
# kernels are built by `make gpu-check`, and Triton must be compiled for the device.
GPU_BACKENDS = ("cuda", "triton")


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request: pytest.FixtureRequest) -> str:
    """One GPU backend, checked usable (a failure, not a skip, on a machine with a device)."""
    name = request.param
    status = rk.backends.available()[name]
    if not status.usable:
        pytest.fail(f"backend {name!r} must be usable on a CUDA machine: {status.reason}")
    if name == "triton":
        from rela_kernels.triton import cosine_loss as triton_kernels

        assert not triton_kernels.is_interpreted(), "Triton runs interpreted with a CUDA device"
    return name
