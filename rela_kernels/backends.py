"""Which backends work on this machine, and which one an op call uses.

Backends: ``reference`` (pure torch, always), ``cpu`` (the C++ extension), ``triton`` (GPU, or CPU
tensors under ``TRITON_INTERPRET=1``), ``cuda`` (the extension built with CUDA). ``auto`` picks the
compiled kernel for the tensors' device and falls back to the reference with a one-time warning.
``RELA_BACKEND=name`` in the environment, or ``backend=`` on a call, forces one.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "BACKENDS",
    "Availability",
    "available",
    "interpreter_enabled",
    "resolve",
    "runs_on",
]

BACKENDS = ("reference", "cpu", "triton", "cuda")

# For CUDA tensors, ``auto`` prefers this backend per op. Triton is the default until a GPU
# benchmark in benchmarks/results/ shows the CUDA kernel faster for an op: the Triton kernels are
# the ones exercised in CI (under the interpreter), the CUDA kernels only compile-checked there.
AUTO_CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {
    "transport": ("triton", "cuda"),
    "cosine_loss": ("triton", "cuda"),
    "transported_cosine_loss": ("triton", "cuda"),
    "select_topk": ("cuda", "triton"),
    "score_and_select": ("cuda", "triton"),
}


@dataclass(frozen=True)
class Availability:
    usable: bool
    reason: str


@functools.lru_cache(maxsize=1)
def _extension() -> tuple[object | None, str]:
    try:
        module = importlib.import_module("rela_kernels._C")
    except ImportError as error:
        return None, f"rela_kernels._C is not built ({error})"
    return module, "rela_kernels._C loaded"


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rela::{op}", key)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _triton_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as error:  # pragma: no cover - broken installs only
        return False, f"triton failed to import ({error})"
    return True, "triton importable"


def available() -> dict[str, Availability]:
    """Each backend: usable here or not, and why (a new dict each call).

    Every op call resolves its backend through this, so the answer is worked out once per
    interpreter setting: the extension, the dispatcher's kernels and the device count do not
    change within a process."""
    return dict(_availability(interpreter_enabled()))


@functools.lru_cache(maxsize=2)
def _availability(interpreted: bool) -> dict[str, Availability]:
    module, ext_reason = _extension()
    result = {"reference": Availability(True, "pure PyTorch, always available")}
    result["cpu"] = Availability(
        module is not None, ext_reason if module is None else "C++ kernels"
    )
    if module is None:
        result["cuda"] = Availability(False, ext_reason)
    elif not _has_kernel("transport", "CUDA"):
        result["cuda"] = Availability(False, "rela_kernels._C was built without CUDA kernels")
    elif not torch.cuda.is_available():
        result["cuda"] = Availability(False, "no CUDA device visible")
    else:
        result["cuda"] = Availability(True, "CUDA kernels")
    ok, reason = _triton_importable()
    if not ok:
        result["triton"] = Availability(False, reason)
    elif torch.cuda.is_available():
        result["triton"] = Availability(True, "Triton on CUDA")
    elif interpreted:
        result["triton"] = Availability(True, "Triton interpreter on CPU tensors (slow; testing)")
    else:
        result["triton"] = Availability(False, "no CUDA device and TRITON_INTERPRET is not set")
    return result


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run on tensors of ``device`` (built or not: see ``available``)."""
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


_warned_fallback: set[str] = set()


# Under torch.compile the choice is made once, at trace time, and baked into the graph: the
# lookups below (imports, environment, dispatcher queries) are not traceable and need not be.
@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend a call of ``op`` on ``device`` uses.

    ``backend`` (argument) beats ``RELA_BACKEND`` (environment) beats ``auto``.
    """
    requested = backend if backend is not None else os.environ.get("RELA_BACKEND", "auto")
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(
                f"rk.{op}: backend must be one of auto, {', '.join(BACKENDS)}; got {requested!r}"
            )
        status = available()[requested]
        if not status.usable:
            raise ValueError(f"rk.{op}: backend {requested!r} is not usable here: {status.reason}")
        if not runs_on(requested, device):
            raise ValueError(f"rk.{op}: backend {requested!r} cannot run on {device.type} tensors")
        return requested
    status = available()
    if device.type == "cuda":
        candidates = AUTO_CUDA_PREFERENCE.get(op, ("triton", "cuda"))
    elif device.type == "cpu":
        candidates = ("cpu",)
    else:
        candidates = ()
    for name in candidates:
        if status[name].usable and runs_on(name, device):
            return name
    if op not in _warned_fallback:
        _warned_fallback.add(op)
        reasons = "; ".join(f"{n}: {status[n].reason}" for n in candidates) or "no kernel"
        warnings.warn(
            f"rk.{op}: no compiled backend for {device.type} tensors ({reasons}); "
            "using the pure-PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"
