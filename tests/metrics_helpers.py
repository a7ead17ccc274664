"""Scraping a store's metrics endpoint over HTTP, as a Prometheus server would."""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

#: Sample values by sample name (``lmtier_hits_total``, ``..._bucket``), then by labels.
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """One GET of ``/metrics`` on loopback: the samples, and each family's type by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples: Samples = defaultdict(dict)
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name][frozenset(sample.labels.items())] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """The value of one series; KeyError if the scrape lacks it."""
    return samples[name][frozenset(labels.items())]


def exposed_names(types: dict[str, str]) -> set[str]:
    """Metric names as an operator queries them: a counter's with ``_total``."""
    return {name + "_total" if kind == "counter" else name for name, kind in types.items()}
