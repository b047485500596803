"""Argument types shared by the subcommands: each raises ``argparse.ArgumentTypeError`` with
the reason, which argparse prints after the option's name."""

from __future__ import annotations

import argparse
import math


def integer_in(minimum: int, limit: int | None = None):
    """An ``int`` type accepting ``minimum <= value`` (and ``value < limit`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum or limit is not None and value >= limit:
            bound = f">= {minimum}" if limit is None else f"in [{minimum}, {_power_of_two(limit)})"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its "invalid ... value" message
    return parse


def _power_of_two(n: int) -> str:
    return f"2**{n.bit_length() - 1}" if n > 1 and n & (n - 1) == 0 else str(n)


def integer_at_least(minimum: int):
    """An ``int`` type refusing values below ``minimum``."""
    return integer_in(minimum)


#: A data/noise seed of the demo and the examples, in ``[0, 2**63)``.
seed = integer_in(0, 2**63)
#: A Philox seed, step or counter, in ``[0, 2**64)``.
unsigned64 = integer_in(0, 2**64)


def positive_float(text: str) -> float:
    """A finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
