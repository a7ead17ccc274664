"""Every metric lmtier exports: name, type, labels, unit, meaning, and what it reads.

docs/metrics.md lists exactly these names (a test compares them), and the collector emits
nothing that is not here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATALOGUE", "NO_TIER", "MetricSpec"]

#: The ``tier`` label of a put that no tier took and of a get that missed everywhere.
NO_TIER = "none"


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    ``source`` is where its values come from: for ``stat`` metrics a key of each tier's
    ``stats()``, for ``histogram`` metrics the name of a tier's histogram in a ``Snapshot``
    (``put_seconds``, ``get_bytes``, ...), for ``engine`` metrics a field of the store's
    ``EngineCounters``.
    """

    name: str  # as scraped (a counter's with its ``_total``)
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    source: str
    origin: str = "stat"  # "stat", "histogram" or "engine"
    unit: str = ""  # "bytes" or "seconds": the name ends with it (before a counter's _total)
    labels: tuple[str, ...] = ("tier",)
    redis_only: bool = False  # only redis tiers have it: absent from a store without one
    with_no_tier: bool = False  # a histogram with a ``tier="none"`` series (see NO_TIER)


def _counter(stat: str, name: str, help: str, unit: str = "", redis: bool = False) -> MetricSpec:
    return MetricSpec(f"lmtier_{name}_total", "counter", help, stat, unit=unit, redis_only=redis)


def _gauge(stat: str, name: str, help: str, unit: str = "", redis: bool = False) -> MetricSpec:
    return MetricSpec(f"lmtier_{name}", "gauge", help, stat, unit=unit, redis_only=redis)


def _histogram(source: str, name: str, help: str, unit: str, no_tier: bool) -> MetricSpec:
    return MetricSpec(
        f"lmtier_{name}", "histogram", help, source, "histogram", unit, with_no_tier=no_tier
    )


CATALOGUE: tuple[MetricSpec, ...] = (
    # ------------------------------------------------------------- tier counters (stats())
    _counter("hits", "hits", "Gets served by the tier."),
    _counter("misses", "misses", "Gets that looked in the tier and did not find the key there."),
    _counter("puts", "puts", "Entries that a put committed into the tier."),
    _counter("evictions", "evictions", "Victims the tier's evictor chose to make room."),
    _counter("demotions_in", "demotions_in", "Entries demoted into the tier from the one above."),
    _counter("demotions_out", "demotions_out", "Entries the tier demoted to a tier below."),
    _counter(
        "unwritten_demotions",
        "unwritten_demotions",
        "Demotions out that wrote nothing: a clean copy below took over.",
    ),
    _counter(
        "copies_evicted", "copies_evicted", "Clean copies evicted while a higher tier held the key."
    ),
    _counter(
        "written_ahead",
        "written_ahead",
        "Clean copies written into the tier ahead of their key's eviction above (write_ahead).",
    ),
    _counter("promotions_in", "promotions_in", "Entries promoted into the tier on a lower hit."),
    _counter("promotions_out", "promotions_out", "Entries promoted from the tier to one above."),
    _counter("drops", "drops", "Victims no lower tier took: lost from the store."),
    _counter("corrupt", "corrupt", "Entries dropped because their stored bytes failed a check."),
    _counter("errors", "errors", "Writes or reads that failed (went elsewhere, or a miss)."),
    _counter("room_timeouts", "room_timeouts", "Puts or moves that waited for room in vain."),
    _counter("admission_rejects", "admission_rejects", "Offers the admission policy refused."),
    _counter(
        "bytes_in",
        "received_bytes",
        "Bytes committed into the tier: puts, demotions and promotions in.",
        unit="bytes",
    ),
    _counter(
        "bytes_out",
        "sent_bytes",
        "Bytes read out of the tier: gets served and demotions written below.",
        unit="bytes",
    ),
    _counter("unavailable", "unavailable", "Operations failed at once: the server was down."),
    _counter("fetched", "fetched", "Gets served from shared storage this store had not indexed."),
    _counter("round_trips", "round_trips", "Round trips to the redis server.", redis=True),
    # ------------------------------------------------------------- tier gauges (stats())
    _gauge("entries", "entries", "Entries the tier holds."),
    _gauge("resident_bytes", "resident_bytes", "Bytes held or being written.", unit="bytes"),
    _gauge("budget_bytes", "budget_bytes", "The tier's byte budget.", unit="bytes"),
    _gauge("pinned_entries", "pinned_entries", "Entries a reader or an engine pinned."),
    _gauge("pinned_bytes", "pinned_bytes", "Bytes of the pinned entries.", unit="bytes"),
    _gauge("moving_out", "moving_out_entries", "Victims being moved out of the tier now."),
    _gauge("clean_copies", "clean_copies", "Entries that are clean copies of a key held higher."),
    _gauge("available", "available", "1 while the redis server is reachable, else 0.", redis=True),
    # ------------------------------------------------------------- histograms (observed)
    _histogram(
        "put_seconds", "put_duration_seconds",
        "Time a put took, by the tier it landed in (none: no tier took it).", "seconds", True,
    ),
    _histogram(
        "get_seconds", "get_duration_seconds",
        "Time a get took, by the tier that served it (none: a miss).", "seconds", True,
    ),
    _histogram(
        "load_seconds", "load_duration_seconds",
        "Time reading an entry out of a disk or redis tier took (for a get or a demotion).",
        "seconds", False,
    ),
    _histogram(
        "put_bytes", "put_size_bytes",
        "Bytes of each put, by the tier it landed in (none: no tier took it).", "bytes", True,
    ),
    _histogram("get_bytes", "get_size_bytes", "Bytes of each hit, by the tier that served it.",
               "bytes", False),
    _histogram("load_bytes", "load_size_bytes",
               "Bytes of each entry read out of a disk or redis tier.", "bytes", False),
    # ------------------------------------------------------------- engine API
    MetricSpec(
        "lmtier_engine_lookups_total", "counter", "Prefix lookups of the engine API.",
        "lookups", "engine", labels=(),
    ),
    MetricSpec(
        "lmtier_engine_lookup_tokens_total", "counter",
        "Tokens the engine API's prefix lookups asked about.", "tokens", "engine", labels=(),
    ),
    MetricSpec(
        "lmtier_engine_hit_tokens_total", "counter",
        "Leading tokens the prefix lookups found cached, by the tier holding their chunk.",
        "hit_tokens", "engine",
    ),
)  # fmt: skip
