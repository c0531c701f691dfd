"""argparse value types shared by the command-line entry points (cli, bench, demo)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


def _number(convert: Callable[[str], N], ok: Callable[[N], bool],
            what: str) -> Callable[[str], N]:
    """An argparse type: ``convert(text)`` if ``ok`` of it, else an error naming the text."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


#: An integer >= 1.
positive_int = _number(int, lambda v: v > 0, "a positive integer")
#: A number > 0.
positive_float = _number(float, lambda v: v > 0, "a positive number")
#: An integer >= 0.
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
#: A number >= 0 (not NaN).
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
