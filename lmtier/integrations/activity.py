"""What an engine integration has done, as one INFO line per interval: "is it working?".

The line counts, since the integration started, the keys the engine looked up and how many
lmtier held, the blocks stored and loaded (and those that failed), and each tier's bytes::

    lmtier vLLM tier 'LmtierSecondaryTier': 32 lookups, 16 hits (50.0%); 16 blocks stored,
    16 loaded; disk 1.0 MiB of 256 MiB

(one line in the log).  A line is written only for an interval in which something changed, so
an idle engine stays quiet; the integration's close writes the last one.  ``report_interval_s``
in the lmtier config sets the interval (0: no line).  The reporter runs on the store's event
loop (``BlockingStore.submit``): it reads the store's tiers where the store lives, and costs
the engine's thread nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmtier.integrations.blocking import BlockingStore
from lmtier.store import TieredStore, TierInfo

__all__ = ["Activity", "ActivityReporter", "activity_line", "human_bytes", "show_lmtier_logs"]

log = logging.getLogger(__name__)

_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


@dataclass
class Activity:
    """An integration's totals since it started (written by its threads, read by the line)."""

    lookups: int = 0  # keys the engine asked about
    hits: int = 0  # of those, the keys lmtier held
    stored: int = 0  # blocks (pages) written into lmtier
    store_failed: int = 0
    loaded: int = 0  # blocks (pages) read out of lmtier
    load_failed: int = 0


def show_lmtier_logs() -> None:
    """Make lmtier's INFO lines reach stderr in an engine that configures only its own logger.

    vLLM gives its ``vllm`` logger a handler and leaves the root logger bare, so a plugin's
    lines would be dropped (Python's last resort prints warnings only).  Where neither lmtier's
    logger nor the root has a handler, lmtier's gets one, in vLLM's format, at INFO unless
    ``LMTIER_LOG_LEVEL`` set a level; an engine that configures the root (SGLang) is left as is.
    """
    logger = logging.getLogger("lmtier")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S")
    )
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def human_bytes(count: float) -> str:
    """``count`` bytes in the largest binary unit that keeps it >= 1 (``1.5 GiB``, ``512 B``)."""
    for unit, size in _UNITS:
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def activity_line(label: str, activity: Activity, tiers: Sequence[TierInfo]) -> str:
    """The report's text: ``label``'s totals and each tier's bytes of its budget."""
    if activity.lookups:
        ratio = f"{activity.hits} hits ({100 * activity.hits / activity.lookups:.1f}%)"
    else:
        ratio = "no hits"
    stored = f"{activity.stored} blocks stored" + _failed(activity.store_failed)
    loaded = f"{activity.loaded} loaded" + _failed(activity.load_failed)
    held = ", ".join(
        f"{tier.name} {human_bytes(tier.resident_bytes)} of {human_bytes(tier.budget)}"
        for tier in tiers
    )
    return f"{label}: {activity.lookups} lookups, {ratio}; {stored}, {loaded}; {held}"


def _failed(count: int) -> str:
    return f" ({count} failed)" if count else ""


class ActivityReporter:
    """Logs ``activity_line`` at most once per ``interval_s`` seconds of ``clock``, and only
    after the totals changed; ``start`` runs it on a store's loop until the store closes."""

    def __init__(
        self,
        label: str,
        read: Callable[[], Activity],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.label = label
        self.interval_s = interval_s
        self._read = read
        self._clock = clock
        self._due = clock() + interval_s
        self._last = Activity()

    def tick(self, tiers: Sequence[TierInfo]) -> str | None:
        """The line logged if an interval has ended since the last tick, else None."""
        now = self._clock()
        if now < self._due:
            return None
        self._due = now + self.interval_s
        return self.report(tiers)

    def report(self, tiers: Sequence[TierInfo]) -> str | None:
        """Log the line now if the totals changed since the last one; the line, or None."""
        totals = dataclasses.replace(self._read())
        if totals == self._last:
            return None
        self._last = totals
        line = activity_line(self.label, totals, tiers)
        log.info("%s", line)
        return line

    def seconds_left(self) -> float:
        return max(0.0, self._due - self._clock())

    async def run(self, store: TieredStore) -> None:
        """Tick once per interval until cancelled; then the last line."""
        try:
            while True:
                await asyncio.sleep(self.seconds_left())
                self.tick(store.tier_infos())
        except asyncio.CancelledError:
            self.report(store.tier_infos())
            raise

    def start(self, blocking: BlockingStore) -> None:
        """Run on ``blocking``'s loop until the store closes (the close writes the last line)."""
        blocking.submit_background(self.run)
