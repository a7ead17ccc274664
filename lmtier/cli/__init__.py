"""The ``lmtier`` command and its tools, on a floor of their own above the library."""

from __future__ import annotations

from lmtier.cli.main import main

__all__ = ["main"]
