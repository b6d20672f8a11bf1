"""argparse ``type=`` functions for the command-line-only flags (the ``fit`` flags are checked
by :meth:`rela_train.config.TrainConfig.validate`): each rejects a bad value at parse time, so
argparse reports ``argument --flag: expected ..., got ...`` in one line, before anything runs.
:class:`Bounds` describes a numeric range for these and for the ``fit`` fields' metadata alike."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Bounds",
    "device",
    "finite_float",
    "fraction_open",
    "fraction_upper_closed",
    "non_empty",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|[a-z]+(:\d+)?")


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric setting: ``low`` to ``high`` (``None``: unbounded), each end
    closed unless marked open; ``note`` follows the range in the error message."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def __str__(self) -> str:
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            text = (
                f"in {'(' if self.low_open else '['}{self.low}, {self.high}"
                f"{')' if self.high_open else ']'}"
            )
        return text + self.note


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(parse: Callable[[str], float], kind: str, bounds: Bounds) -> Callable[[str], Any]:
    """An argparse type: ``parse``, then ``bounds`` (``expected KIND >= 1, got ...``)."""

    def check(text: str) -> Any:
        value = parse(text)
        if value not in bounds:
            raise argparse.ArgumentTypeError(f"expected {kind} {bounds}, got {text}")
        return value

    check.__name__ = f"{kind} {bounds}"
    return check


positive_int = _bounded(_integer, "an integer", Bounds(1))
non_negative_int = _bounded(_integer, "an integer", Bounds(0))
positive_float = _bounded(_number, "a number", Bounds(0, low_open=True))
non_negative_float = _bounded(_number, "a number", Bounds(0))
fraction_open = _bounded(_number, "a fraction", Bounds(0, 1, low_open=True, high_open=True))
fraction_upper_closed = _bounded(_number, "a fraction", Bounds(0, 1, low_open=True))


def finite_float(text: str) -> float:
    return _number(text)


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty value, got {text!r}")
    return text


def device(text: str) -> str:
    if _DEVICE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text
