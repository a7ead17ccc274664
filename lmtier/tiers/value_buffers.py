"""Reused buffers for the values the redis tier sends.

Fresh multi-MiB allocations page-fault on every write (measured: the value's copy ran at a fifth
of the speed of a copy into reused memory), so value buffers are kept for reuse, in 4 KiB size
steps so that entries of one shape share them, up to a bound in bytes.
"""

from __future__ import annotations

__all__ = ["MAX_POOLED_BYTES", "ValueBuffers"]

#: Bytes of value buffers kept for reuse at most (a pipelined batch of 2 MiB chunks fits 32).
MAX_POOLED_BYTES = 64 << 20
# Smaller buffers cost little to allocate: not worth keeping.
_SMALLEST_KEPT = 1 << 16


class ValueBuffers:
    """A pool of ``bytearray`` buffers by size (4 KiB steps), bounded by ``MAX_POOLED_BYTES``."""

    def __init__(self) -> None:
        self._buffers: dict[int, list[bytearray]] = {}
        self._pooled_bytes = 0

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (its size rounded up to 4 KiB)."""
        rounded = -(-size // 4096) * 4096
        bucket = self._buffers.get(rounded)
        if not bucket:
            return bytearray(rounded)
        self._pooled_bytes -= rounded
        return bucket.pop()

    def give_back(self, buffer: bytearray) -> None:
        """Keep ``buffer`` for a later ``take``, unless small or the pool is full."""
        if len(buffer) >= _SMALLEST_KEPT and self._pooled_bytes + len(buffer) <= MAX_POOLED_BYTES:
            self._buffers.setdefault(len(buffer), []).append(buffer)
            self._pooled_bytes += len(buffer)
