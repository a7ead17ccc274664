"""The Prometheus collector of a store: every metric of the catalogue, read at scrape time."""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from lmtier.monitoring.catalogue import CATALOGUE, NO_TIER, MetricSpec
from lmtier.monitoring.snapshot import Snapshot

__all__ = ["StoreCollector"]


class StoreCollector:
    """Reads a store's counters where the store keeps them (``stats()``, its histograms, its
    engine counters) when a scrape asks, rather than mirroring every event into client-side
    metric objects; a metric without any series (a redis-only one) is left out."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        """Every name this collector may emit, so that a registry refuses a clash at once."""
        return [_family(spec) for spec in CATALOGUE]

    def collect(self) -> list[Metric]:
        snapshot = self._snapshot()
        families = []
        for spec in CATALOGUE:
            family = _family(spec)
            _fill(family, spec, snapshot)
            if family.samples:
                families.append(family)
        return families


def _family(spec: MetricSpec) -> Metric:
    labels = list(spec.labels)
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=labels, unit=spec.unit)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=labels, unit=spec.unit)
    return HistogramMetricFamily(spec.name, spec.help, labels=labels, unit=spec.unit)


def _fill(family: Metric, spec: MetricSpec, snapshot: Snapshot) -> None:
    if spec.origin == "stat":
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        for tier, stats in snapshot.tiers.items():
            if spec.source in stats:
                family.add_metric([tier], float(stats[spec.source]))
    elif spec.origin == "histogram":
        assert isinstance(family, HistogramMetricFamily)
        for label, histograms in snapshot.histograms.items():
            if (label == NO_TIER and not spec.with_no_tier) or spec.source not in histograms:
                continue  # a load histogram of a memory tier, which has none
            buckets, total = histograms[spec.source]
            family.add_metric([label], [(_le(bound), count) for bound, count in buckets], total)
    else:
        assert isinstance(family, CounterMetricFamily)
        engine = snapshot.engine
        if spec.labels:  # by tier: every tier of the store, hit or not
            hit_tokens = getattr(engine, spec.source)
            for tier in snapshot.tiers:
                family.add_metric([tier], float(hit_tokens[tier]))
        else:
            family.add_metric([], float(getattr(engine, spec.source)))


def _le(bound: float) -> str:
    """A bucket's ``le`` label: the bound as Prometheus parses it."""
    return "+Inf" if math.isinf(bound) else repr(bound)
