"""Byte counts as a reader reads them: ``100 GiB``, not ``107374182400 bytes``."""

from __future__ import annotations

__all__ = ["human_bytes"]

# Binary units, largest first: budgets and files are sized in powers of 1024.
_UNITS = (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def human_bytes(count: float) -> str:
    """``count`` bytes in the largest binary unit it fills, to three significant digits.

    ``human_bytes(100 * 2**30)`` is ``"100 GiB"``, ``human_bytes(1536)`` is ``"1.5 KiB"``, and
    under a KiB the count itself: ``"512 B"``.  Every size the package prints goes through here.
    """
    for unit, size in _UNITS:
        if abs(count) >= size:
            value = count / size
            digits = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
            return f"{digits} {unit}"
    return f"{count:.0f} B"
