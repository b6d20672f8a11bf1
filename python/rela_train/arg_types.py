"""argparse ``type=`` functions for the command-line-only flags (the ``fit`` flags are checked
by :meth:`rela_train.config.TrainConfig.validate`): each rejects a bad value at parse time, so
argparse reports ``argument --flag: expected ..., got ...`` in one line, before anything runs."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

__all__ = [
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


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def finite_float(text: str) -> float:
    return _number(text)


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _fraction(low_closed: bool, high_closed: bool) -> Callable[[str], float]:
    interval = f"{'[' if low_closed else '('}0, 1{']' if high_closed else ')'}"

    def parse(text: str) -> float:
        value = _number(text)
        low_ok = value >= 0 if low_closed else value > 0
        high_ok = value <= 1 if high_closed else value < 1
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"expected a fraction in {interval}, got {text}")
        return value

    parse.__name__ = f"fraction in {interval}"
    return parse


fraction_open = _fraction(False, False)  # (0, 1)
fraction_upper_closed = _fraction(False, True)  # (0, 1]


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty value, got {text!r}")
    return text


def device(text: str) -> str:
    if _DEVICE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text
