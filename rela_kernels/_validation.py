"""Argument checks shared by the public API.

Every failure names the argument, what was expected and what came, and raises before any work is
done, so a rejected call never modifies anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCORE_DTYPES = FLOAT_INPUT_DTYPES


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    where: str,
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape_hint: str = "",
) -> torch.Tensor:
    """Type, rank and dtype of one tensor argument."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{where}: {name} must be {ndim}-D{hint}, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(
            f"{where}: {name} must have dtype {_dtype_names(dtypes)}, got {value.dtype}"
        )
    return value


def check_same_device(where: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{where}: {name} is on {tensor.device} but {first_name} is on {first.device}; "
                "all inputs must be on one device"
            )
    return first.device


def check_rows(where: str, name: str, tensor: torch.Tensor, rows: int | None = None) -> int:
    """A non-empty batch (and, if given, exactly ``rows`` rows)."""
    n = tensor.shape[0]
    if n == 0:
        raise ValueError(f"{where}: {name} must have at least one row, got an empty batch")
    if rows is not None and n != rows:
        raise ValueError(f"{where}: {name} must have {rows} rows (the batch size), got {n}")
    return n


def check_eps(where: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{where}: eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{where}: eps must be a finite number > 0, got {eps}")
    return float(eps)


def check_reduction(where: str, reduction: object) -> str:
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"{where}: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_weight(
    where: str, weight: object, rows: int, device: torch.device
) -> torch.Tensor | None:
    if weight is None:
        return None
    weight = check_tensor(where, "weight", weight, ndim=1, shape_hint=f"[{rows}]")
    if not weight.is_floating_point():
        raise TypeError(f"{where}: weight must be a floating-point tensor, got {weight.dtype}")
    if weight.shape[0] != rows:
        raise ValueError(
            f"{where}: weight must have {rows} entries (one per row), got {weight.shape[0]}"
        )
    if weight.device != device:
        raise ValueError(f"{where}: weight is on {weight.device} but the inputs are on {device}")
    return weight


def check_k(where: str, k: object, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{where}: k must be an int, got {type(k).__name__}")
    if not 0 <= k <= n:
        raise ValueError(f"{where}: k must be in [0, {n}] (the number of scores), got {k}")
    return k


def check_finite(where: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta":  # shapes only: there are no values to check
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{where}: {name} must be finite, got {bad} non-finite value(s)")
