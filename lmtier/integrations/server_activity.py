"""The activity line of an integration whose store runs in an lmtier server.

With no store (and no store loop) in the engine's process, an ``ActivityReporter`` ticks on a
daemon thread of its own, and each tier's bytes come from the server's stats; a server that
does not answer leaves the tiers out of that line.  ``stop`` writes the last line.
"""

from __future__ import annotations

import threading

from lmtier.errors import LmtierError
from lmtier.integrations.activity import ActivityReporter
from lmtier.server import ServerClient
from lmtier.store import TierInfo

__all__ = ["ServerActivity"]

# How long a line waits for the server's stats: a line is not worth holding up the thread.
_STATS_TIMEOUT_S = 5.0


class ServerActivity:
    """Runs ``reporter`` on a daemon thread, with the tiers of ``client``'s server."""

    def __init__(self, reporter: ActivityReporter, client: ServerClient) -> None:
        self.reporter = reporter
        self.client = client
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmtier-activity", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self.reporter.seconds_left()):
            self.reporter.tick(self.tiers())
        self.reporter.report(self.tiers())

    def tiers(self) -> list[TierInfo]:
        """The server's tiers, as a report sees them; none while it does not answer."""
        try:
            stats = self.client.server_stats(timeout=_STATS_TIMEOUT_S)["store"]["tiers"]
        except (LmtierError, KeyError, TypeError):
            return []
        return [
            TierInfo(
                name=name,
                kind=str(tier.get("kind", "")),
                budget=int(tier.get("budget_bytes", 0)),
                resident_bytes=int(tier.get("resident_bytes", 0)),
                shared=False,
                admission="",
                available=True,
                counters={},
            )
            for name, tier in stats.items()
        ]

    def stop(self) -> None:
        """Write the last line (if anything changed) and end the thread."""
        self._stopping.set()
        self._thread.join()
