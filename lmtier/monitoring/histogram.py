"""Histograms cheap enough for every put, get and load: an observation is two list appends,
and the bucketing is done in batches with numpy."""

from __future__ import annotations

import numpy as np

__all__ = ["BYTES_BUCKETS", "SECONDS_BUCKETS", "HistogramRead", "OperationHistograms"]

#: Upper bounds of latency buckets, in seconds: from a memory hit (~20 µs) to a put that waited
#: out a room timeout (30 s by default).
SECONDS_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Upper bounds of size buckets, in bytes: powers of 4 from 1 KiB to 1 GiB (KV chunks).
BYTES_BUCKETS = tuple(float(1024 * 4**i) for i in range(11))
#: A histogram as read: cumulative counts by upper bound (infinity last), and the sum.
HistogramRead = tuple[list[tuple[float, int]], float]

# Observations wait in lists until this many, then go into the buckets in one batch.
_BATCH = 1024


class OperationHistograms:
    """One kind of operation on one tier: how long each took and how many bytes it moved.

    An observation only appends to two lists (this runs on every hit: bucketing each value as it
    comes costs more); every ``_BATCH`` observations, and whenever the histograms are read,
    numpy sorts the waiting values into the buckets.  Written by one thread, the store's
    event loop; ``read`` from another thread (a scrape while the loop is stuck) only reads.
    """

    __slots__ = ("_bytes", "_bytes_buckets", "_seconds", "_seconds_buckets")

    def __init__(self) -> None:
        self._seconds: list[float] = []
        self._bytes: list[int] = []  # shorter than _seconds by the operations without bytes
        self._seconds_buckets = _Buckets(SECONDS_BUCKETS)
        self._bytes_buckets = _Buckets(BYTES_BUCKETS)

    def observe(self, seconds: float, nbytes: int) -> None:
        """An operation that took ``seconds`` and moved ``nbytes`` (0: none, as a miss)."""
        waiting = self._seconds
        waiting.append(seconds)
        if nbytes:
            self._bytes.append(nbytes)
        if len(waiting) >= _BATCH:
            self.fold()

    def fold(self) -> None:
        """Put the waiting observations into the buckets (on the writing thread only)."""
        seconds, self._seconds = self._seconds, []
        sizes, self._bytes = self._bytes, []
        self._seconds_buckets.add(seconds)
        self._bytes_buckets.add(sizes)

    def read(self) -> tuple[HistogramRead, HistogramRead]:
        """The latency histogram and the size histogram, waiting observations included."""
        return self._seconds_buckets.read(list(self._seconds)), self._bytes_buckets.read(
            list(self._bytes)
        )


class _Buckets:
    """Counts per bucket (the last one above every bound) and the sum of the values."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = np.array(bounds)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.total = 0.0

    def add(self, values: list[float] | list[int]) -> None:
        counts, total = self._count(values)
        self.counts += counts
        self.total += total

    def read(self, waiting: list[float] | list[int]) -> HistogramRead:
        counts, total = self._count(waiting)
        cumulative = np.cumsum(self.counts + counts)
        bounds = [*self.bounds.tolist(), float("inf")]
        return list(zip(bounds, cumulative.tolist(), strict=True)), self.total + total

    def _count(self, values: list[float] | list[int]) -> tuple[np.ndarray, float]:
        if not values:
            return np.zeros_like(self.counts), 0.0
        array = np.fromiter(values, dtype=np.float64, count=len(values))
        # side="left": the first bound >= the value, as Prometheus buckets are "less or equal".
        where = np.searchsorted(self.bounds, array, side="left")
        return np.bincount(where, minlength=len(self.counts)), float(array.sum())
