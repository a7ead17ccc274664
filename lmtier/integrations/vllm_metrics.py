"""What the vLLM secondary tier reports through vLLM's metrics, and how it is counted.

Kept apart from the tier (``lmtier.integrations.vllm``) because it is bookkeeping, not
transfer: the names and help of the tier's own block counters, the store's tier counters and
gauges as vLLM metrics, and the arithmetic that turns readings into what changed since the last
report.  The tier decides when to read; this module only counts and formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmtier.integrations.activity import Activity
from lmtier.monitoring import CATALOGUE
from lmtier.store import TieredStore

__all__ = [
    "LMTIER_TIER_LABEL",
    "METRIC_DROPPED",
    "METRIC_LOADED_BLOCKS",
    "METRIC_LOAD_FAILED_BLOCKS",
    "METRIC_SHARED_HITS",
    "METRIC_STORED_BLOCKS",
    "METRIC_STORE_FAILED_BLOCKS",
    "STORE_METRICS",
    "STORE_STATS_INTERVAL_S",
    "Counters",
    "StoreReadings",
    "connector_stats",
    "counter_deltas",
    "metric_definitions",
]

#: A store-side change to report: (vLLM name, kind, lmtier tier, counter increase or gauge value).
StoreChange = tuple[str, str, str, float]

# Metric names (counters labelled by tier type) that get_stats reports.
METRIC_STORED_BLOCKS = "vllm:kv_offload_lmtier_stored_blocks"
METRIC_STORE_FAILED_BLOCKS = "vllm:kv_offload_lmtier_store_failed_blocks"
METRIC_LOADED_BLOCKS = "vllm:kv_offload_lmtier_loaded_blocks"
METRIC_LOAD_FAILED_BLOCKS = "vllm:kv_offload_lmtier_load_failed_blocks"
METRIC_SHARED_HITS = "vllm:kv_offload_lmtier_shared_probe_hits"
METRIC_DROPPED = "vllm:kv_offload_lmtier_dropped_blocks"
_METRIC_DOCS = {
    METRIC_STORED_BLOCKS: "Blocks written from the primary tier into lmtier.",
    METRIC_STORE_FAILED_BLOCKS: "Blocks lmtier could not store (no tier could hold them).",
    METRIC_LOADED_BLOCKS: "Blocks read from lmtier into the primary tier.",
    METRIC_LOAD_FAILED_BLOCKS: "Blocks lmtier could not load (gone, corrupt or unreachable).",
    METRIC_SHARED_HITS: "Blocks found on a shared tier that another instance wrote.",
    METRIC_DROPPED: "Blocks lmtier dropped (evicted from its last tier, or corrupt).",
}
#: The label naming one of lmtier's own tiers (vLLM's ``tier`` label names this secondary tier).
LMTIER_TIER_LABEL = "lmtier_tier"
#: The store's tier counters and gauges as vLLM metrics, by their key in a tier's ``stats()``:
#: (vLLM name, "counter" or "gauge", help).  lmtier's latency and size histograms are not among
#: them: vLLM's stats carry every observation to the front end, one list per scheduler step, and
#: vLLM already times each store and load job of this tier (``transfer_time``).
STORE_METRICS = {
    spec.source: (f"vllm:kv_offload_{spec.name.removesuffix('_total')}", spec.kind, spec.help)
    for spec in CATALOGUE
    if spec.origin == "stat"
}
#: How often ``get_stats`` asks the store's thread for its tiers' stats.
STORE_STATS_INTERVAL_S = 1.0


@dataclass
class Counters:
    """The tier's own tallies (read by the scheduler, bumped on either thread)."""

    lookups: int = 0  # settled answers (HIT or MISS) to the scheduler's lookups
    hits: int = 0
    stored: int = 0
    store_failed: int = 0
    loaded: int = 0
    load_failed: int = 0
    shared_hits: int = 0
    dropped: int = 0

    def activity(self) -> Activity:
        """The totals the periodic INFO line reports."""
        return Activity(
            lookups=self.lookups,
            hits=self.hits,
            stored=self.stored,
            store_failed=self.store_failed,
            loaded=self.loaded,
            load_failed=self.load_failed,
        )


def metric_definitions() -> dict[str, Any]:
    """vLLM's metric metadata for every name ``connector_stats`` may report."""
    from vllm.v1.kv_offload.base import OffloadingCounterMetadata, OffloadingGaugeMetadata

    definitions: dict[str, Any] = {
        name: OffloadingCounterMetadata(documentation=doc, labelnames=("tier",))
        for name, doc in _METRIC_DOCS.items()
    }
    labels = ("tier", LMTIER_TIER_LABEL)
    for name, kind, doc in STORE_METRICS.values():
        metadata = OffloadingCounterMetadata if kind == "counter" else OffloadingGaugeMetadata
        definitions[name] = metadata(documentation=f"lmtier: {doc}", labelnames=labels)
    return definitions


def counter_deltas(now: Counters, reported: Counters) -> dict[str, int]:
    """How much each block counter grew between two copies of the tallies, by metric name."""
    return {
        METRIC_STORED_BLOCKS: now.stored - reported.stored,
        METRIC_STORE_FAILED_BLOCKS: now.store_failed - reported.store_failed,
        METRIC_LOADED_BLOCKS: now.loaded - reported.loaded,
        METRIC_LOAD_FAILED_BLOCKS: now.load_failed - reported.load_failed,
        METRIC_SHARED_HITS: now.shared_hits - reported.shared_hits,
        METRIC_DROPPED: now.dropped - reported.dropped,
    }


def connector_stats(
    tier_type: str, deltas: dict[str, int], store_changes: list[StoreChange]
) -> Any:
    """The changes as vLLM's OffloadingConnectorStats; None where this vLLM has no such class."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
            OffloadingConnectorStats,
        )
    except ImportError:
        return None
    stats = OffloadingConnectorStats()
    for name, value in deltas.items():
        if value:
            stats.increase_counter(name, value, (tier_type,))
    for name, kind, lmtier_tier, change in store_changes:
        if kind == "counter":
            stats.increase_counter(name, change, (tier_type, lmtier_tier))
        else:
            stats.set_gauge(name, change, (tier_type, lmtier_tier))
    return stats


class StoreReadings:
    """The store's tier stats as last read, and the values last reported by (stat, tier)."""

    def __init__(self) -> None:
        # The latest reading and its number (one tuple, so the scheduler reads a whole
        # reading), the number last reported, and the values reported by (stat, lmtier tier).
        self._reading: tuple[int, dict[str, dict[str, Any]]] = (0, {})
        self._reading_reported = 0
        self._reported: dict[tuple[str, str], float] = {}

    def take(self, store: TieredStore) -> None:
        """Read the store's tier stats (on the store's thread)."""
        self._reading = (self._reading[0] + 1, store.tier_stats())

    def unreported(self) -> list[StoreChange]:
        """What the latest reading changed since the last report (none if already reported)."""
        number, tiers = self._reading
        if number == self._reading_reported:
            return []
        self._reading_reported = number
        return self._changes_since_reported(tiers)

    def _changes_since_reported(self, tiers: dict[str, dict[str, Any]]) -> list[StoreChange]:
        changes = []
        for lmtier_tier, stats in tiers.items():
            for stat, (name, kind, _) in STORE_METRICS.items():
                if stat not in stats:
                    continue
                value = float(stats[stat])
                before = self._reported.get((stat, lmtier_tier))
                if before == value:
                    continue
                self._reported[(stat, lmtier_tier)] = value
                change = value - (before or 0.0) if kind == "counter" else value
                changes.append((name, kind, lmtier_tier, change))
        return changes
