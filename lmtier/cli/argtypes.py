"""Command-line argument types shared by ``lmtier`` and the scripts: clear errors at parse time.

The only I/O here is ``output_path``'s check that a file can be written where it is asked for,
so that a long run never fails at its very end for want of a folder.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

__all__ = [
    "byte_size",
    "float_list",
    "name_list",
    "non_negative_float_list",
    "output_path",
    "positive_int",
    "user_path",
]

_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


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


def byte_size(text: str) -> int:
    """A byte count: a number with an optional unit K, M, G or T (powers of 1024; ``KiB``,
    ``KB`` and ``K`` mean the same), e.g. ``512M``, ``1.5G``, ``1000000``."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a byte size: {text!r} (a number with an optional K, M, G or T, e.g. 512M)"
        )
    value = int(float(match["number"]) * _UNITS[match["unit"].lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 bytes, got {text!r}")
    return value


def user_path(text: str) -> Path:
    """A path as typed, ``~`` and ``~user`` expanded (every path argument goes through here)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty")
    return Path(os.path.expanduser(text))


def output_path(text: str) -> Path:
    """A file the command will write: its folder must exist and be writable now, so that a
    long run does not fail at its end; an existing file there must be writable too."""
    path = user_path(text)
    folder = path.parent
    if not folder.is_dir():
        why = "does not exist" if not folder.exists() else "is not a folder"
        raise argparse.ArgumentTypeError(f"cannot write {path}: the folder {folder} {why}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {path}: it is a folder, not a file")
    target = path if path.exists() else folder
    if not os.access(target, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {target} is not writable")
    return path
