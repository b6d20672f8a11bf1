"""Argument checks shared by the public API.

Every failure names the argument, what was expected and what came, and raises before any work is
done, so a rejected call never modifies anything.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rela_kernels.transport import Transport

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
    floating: bool = False,
) -> torch.Tensor:
    """Type, rank and dtype of one tensor argument (``floating``: any floating-point dtype)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{where}: {name} must be {ndim}-D{hint}, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {value.dtype}")
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


def check_int(where: str, name: str, value: object, low: int, high: int | None = None) -> int:
    """An int (numpy integers included, bool excluded) in ``[low, high]``; returned as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{where}: {name} must be {bounds}, got {value}")
    return value


def check_fraction(where: str, name: str, value: object) -> float:
    """A real number in (0, 1]; returned as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a float in (0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{where}: {name} must be in (0, 1], got {value}")
    return value


def check_anneal(where: str, anneal: object, epochs: object) -> tuple[float, int | None]:
    """InfoBatch annealing: ``anneal`` a real number in [0, 1) and ``epochs`` (the run's length,
    an int >= 1, or None) given whenever ``anneal > 0``; returned as ``(float, int or None)``."""
    if isinstance(anneal, bool) or not isinstance(anneal, numbers.Real):
        raise TypeError(f"{where}: anneal must be a float in [0, 1), got {type(anneal).__name__}")
    value = float(anneal)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ValueError(f"{where}: anneal must be in [0, 1), got {anneal}")
    if value > 0 and epochs is None:
        raise ValueError(f"{where}: anneal > 0 needs epochs (the run's length), got None")
    return value, None if epochs is None else check_int(where, "epochs", epochs, 1)


def check_text(where: str, name: str, value: object) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}")
    return value


def check_largest(where: str, largest: object) -> bool:
    if not isinstance(largest, bool):
        raise TypeError(f"{where}: largest must be a bool, got {type(largest).__name__}")
    return largest


def check_no_nan(where: str, name: str, values: torch.Tensor) -> None:
    """No NaN in a floating-point tensor (skipped while compiling: it needs a host sync)."""
    if torch.compiler.is_compiling() or not values.is_floating_point():
        return
    if bool(torch.isnan(values).any()):
        raise ValueError(
            f"{where}: {name} must not contain NaN, got {int(torch.isnan(values).sum())}"
        )


def check_p(where: str, p: object) -> torch.Tensor:
    """Prior embeddings ``[B, Dp]``, a non-empty batch."""
    p = check_tensor(where, "p", p, ndim=2, dtypes=FLOAT_INPUT_DTYPES, shape_hint="[B, Dp]")
    check_rows(where, "p", p)
    return p


def check_p_width(where: str, p: torch.Tensor, t: Transport) -> None:
    if p.shape[1] != t.in_dim:
        raise ValueError(
            f"{where}: p must have {t.in_dim} columns (the transport's input width), "
            f"got shape {tuple(p.shape)}"
        )


def check_z(where: str, z: object, rows: int | None, width: int | None) -> torch.Tensor:
    """Predictions ``[B, d]``: ``rows`` rows and ``width`` columns when given; never 0 columns."""
    z = check_tensor(where, "z", z, ndim=2, dtypes=FLOAT_INPUT_DTYPES, shape_hint="[B, d]")
    check_rows(where, "z", z, rows)
    if width is not None and z.shape[1] != width:
        raise ValueError(
            f"{where}: z must have {width} columns (the transport's output width), "
            f"got shape {tuple(z.shape)}"
        )
    if z.shape[1] == 0:
        raise ValueError(f"{where}: z must have at least one column, got shape {tuple(z.shape)}")
    return z


def raise_non_finite(
    where: str, out: torch.Tensor, weight: torch.Tensor | None = None, **inputs: torch.Tensor
) -> None:
    """Outputs are finite whenever the inputs are; name the input that is not. ``weight`` does
    not enter the rows, so it is checked too (in the same host sync). Skipped while compiling."""
    if torch.compiler.is_compiling():
        return
    finite = torch.isfinite(out).all()
    if weight is not None:
        finite = finite & torch.isfinite(weight).all()
    if bool(finite):
        return
    for name, tensor in (*inputs.items(), ("weight", weight)):
        if tensor is None:
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"{where}: {name} must be finite, got {bad} non-finite value(s)")
    raise ValueError(f"{where}: the result overflowed to a non-finite value")
