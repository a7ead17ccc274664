"""Command-line argument types shared by ``lmtier`` and the scripts: clear errors, no I/O."""

from __future__ import annotations

import argparse

__all__ = ["float_list", "name_list", "non_negative_float_list", "positive_int"]


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None


def float_list(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers, each > 0."""
    values = _numbers(text)
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"every value must be > 0: {text}")
    return values


def non_negative_float_list(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers >= 0, zeros left out (``0`` alone means none)."""
    values = _numbers(text)
    if values and min(values) < 0:
        raise argparse.ArgumentTypeError(f"no value may be < 0: {text}")
    return tuple(value for value in values if value > 0)


def name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
