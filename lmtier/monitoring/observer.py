"""A store's metrics: the histograms it feeds as it works, its registry, its HTTP server."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from lmtier.config import MetricsConfig
from lmtier.metrics import EngineCounters
from lmtier.monitoring.catalogue import NO_TIER
from lmtier.monitoring.collector import StoreCollector
from lmtier.monitoring.histogram import HistogramRead, OperationHistograms
from lmtier.monitoring.on_loop import LoopHome, call_on_loop
from lmtier.monitoring.server import MetricsServer
from lmtier.monitoring.snapshot import Snapshot
from lmtier.tiers.base import Tier, cascade_stats
from lmtier.tiers.memory import MemoryTier

__all__ = ["OPERATIONS", "StoreMetrics"]

#: The operations observed, each with a latency and a size histogram per tier.
OPERATIONS = ("put", "get", "load")


class StoreMetrics:
    """What a ``TieredStore`` exports: its tiers' ``stats()`` (read at scrape time), the latency
    and size histograms of its puts, gets and loads (fed as it works, when its config has a
    ``metrics`` section), and its engines' lookup counters.

    ``registry`` is the store's own ``CollectorRegistry`` (two stores never clash); an
    application with its own endpoint may serve it, or register ``collector`` in another.
    With ``metrics: {port: N}`` configured, ``serve`` (at the store's open) starts an HTTP
    server on it and ``stop`` (at close) ends it.
    """

    def __init__(self, config: MetricsConfig | None, tiers: Sequence[Tier]) -> None:
        """The store's ``tiers``; with ``config``, the HTTP server that ``serve`` starts."""
        self.config = config
        # The tiers, not the store: the server's thread must not keep a dropped store alive.
        self._tiers = tuple(tiers)
        self.engine = EngineCounters()
        # Only a store whose config has a metrics section times its operations: the rest do
        # not pay for histograms nobody reads.
        monitored = config is not None
        labels: tuple[str | None, ...] = (*self.tier_names, None)
        #: The histograms of puts and gets by the tier that took or served them (None: none
        #: did), or None when not monitored.  The store observes into them itself, from the end
        #: of each call, as one lookup and one call: this runs on every hit.
        self.puts: dict[str | None, OperationHistograms] | None = None
        self.gets: dict[str | None, OperationHistograms] | None = None
        if monitored:
            self.puts = {label: OperationHistograms() for label in labels}
            self.gets = {label: OperationHistograms() for label in labels}
        #: The tiers whose loads are timed: those that read storage, when monitored.  A memory
        #: tier's load hands out its own tensor (the get that copies it is timed).
        self.timed_loads = frozenset(
            t.name for t in self._tiers if monitored and not isinstance(t, MemoryTier)
        )
        self._loads: dict[str | None, OperationHistograms] = {
            label: OperationHistograms() for label in self.timed_loads
        }
        self._home = LoopHome()
        self._server: MetricsServer | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = StoreCollector(self.snapshot)
        self.registry.register(self.collector)

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(tier.name for tier in self._tiers)

    # ------------------------------------------------------------------ the hot path
    def observe_load(self, tier: str, seconds: float, nbytes: int) -> None:
        """``tier`` read an entry of ``nbytes`` bytes in ``seconds`` (kept if it is one of
        ``timed_loads``)."""
        histograms = self._loads.get(tier)
        if histograms is not None:
            histograms.observe(seconds, nbytes)

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> Snapshot:
        """Every value a scrape exports, read between two steps of the store's loop."""
        return call_on_loop(self._home, self._read)

    def _read(self) -> Snapshot:
        histograms: dict[str, dict[str, HistogramRead]] = {}
        by_operation = (self.puts or {}, self.gets or {}, self._loads)
        for operation, by_label in zip(OPERATIONS, by_operation, strict=True):
            for label, observed in by_label.items():
                seconds, sizes = observed.read()
                read = histograms.setdefault(NO_TIER if label is None else label, {})
                read[f"{operation}_seconds"] = seconds
                read[f"{operation}_bytes"] = sizes
        engine = self.engine
        return Snapshot(
            tiers=cascade_stats(self._tiers),
            histograms=histograms,
            engine=EngineCounters(engine.lookups, engine.tokens, Counter(engine.hit_tokens)),
        )

    # ------------------------------------------------------------------ the HTTP server
    @property
    def port(self) -> int | None:
        """The port the HTTP server listens on (the one chosen for port 0), or None."""
        return None if self._server is None else self._server.port

    @property
    def address(self) -> tuple[str, int] | None:
        """The address and port the HTTP server is bound to, or None."""
        return None if self._server is None else (self._server.host, self._server.port)

    def serve(self) -> None:
        """On the store's loop as it opens: remember the loop, start the configured server."""
        self._home.record()
        config = self.config
        if config is not None and config.port is not None and self._server is None:
            self._server = MetricsServer(self.registry, config.host, config.port)

    async def stop(self) -> None:
        """Stop the HTTP server, if any (the port refuses connections once this returns)."""
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.stop)
