"""What one scrape reads of a store, taken at one point of the store's loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmtier.metrics import EngineCounters
from lmtier.monitoring.histogram import HistogramRead

__all__ = ["Snapshot"]


@dataclass
class Snapshot:
    tiers: dict[str, dict[str, Any]]  # each tier's stats(), by tier name
    histograms: dict[str, dict[str, HistogramRead]]  # by tier label, then histogram name
    engine: EngineCounters
