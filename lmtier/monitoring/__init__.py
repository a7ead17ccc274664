"""Prometheus metrics of a store: what it exports (``catalogue``), the histograms it feeds
(``observer``), the collector a scrape reads (``collector``) and the HTTP server (``server``).

At the store's floor: the store imports it; tiers never do.
"""

from lmtier.monitoring.catalogue import CATALOGUE, NO_TIER, MetricSpec
from lmtier.monitoring.collector import StoreCollector
from lmtier.monitoring.histogram import OperationHistograms
from lmtier.monitoring.observer import StoreMetrics

__all__ = [
    "CATALOGUE",
    "NO_TIER",
    "MetricSpec",
    "OperationHistograms",
    "StoreCollector",
    "StoreMetrics",
]
