"""The stall probe: a thread that sleeps in a loop and records how late it wakes.

Its lateness is the time it waited for the interpreter's lock (and for a core) on top of the
kernel's timer slack: a direct measure of how long other threads of the process held the
interpreter.  Used by ``lmtier bench --engine``, the vLLM tier's rows and
``scripts/bench_server.py``.
"""

from __future__ import annotations

import threading
import time

__all__ = ["StallProbe", "quantiles_ms"]


class StallProbe:
    """A thread that sleeps ``period`` seconds in a loop and records how late it wakes."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.lateness: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)

    def _run(self) -> None:
        clock, sleep, period, record = time.perf_counter, time.sleep, self.period, self.lateness
        while not self._stop.is_set():
            before = clock()
            sleep(period)
            record.append(clock() - before - period)

    def __enter__(self) -> StallProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        """p50, p99 and max lateness in milliseconds, and the number of samples."""
        return quantiles_ms(self.lateness)


def quantiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``seconds`` in milliseconds, and how many there are."""
    ordered = sorted(seconds) or [0.0]

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1000,
            "samples": len(seconds)}  # fmt: skip
