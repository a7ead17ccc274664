"""Event counters, kept by tiers, the store and the engine API, and read as plain dicts."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

__all__ = ["EngineCounters", "TierCounters"]


@dataclass
class TierCounters:
    """Event counts of one tier since the store opened."""

    hits: int = 0
    misses: int = 0
    puts: int = 0  # new entries committed by a put
    evictions: int = 0  # victims its evictor chose
    demotions_in: int = 0
    demotions_out: int = 0  # victims moved down, unwritten ones included
    unwritten_demotions: int = 0  # victims whose clean copy below took over: nothing written
    copies_evicted: int = 0  # victims that were clean copies of a key held higher: dropped
    written_ahead: int = 0  # clean copies written into the tier ahead of their key's eviction
    promotions_in: int = 0
    promotions_out: int = 0
    drops: int = 0  # victims no lower tier took
    corrupt: int = 0  # entries dropped because their bytes failed a check
    errors: int = 0  # writes or reads that failed (the entry went elsewhere or was a miss)
    room_timeouts: int = 0  # puts that gave up waiting for demotions to free room
    admission_rejects: int = 0  # offers (puts, demotions, promotions) its admission refused
    bytes_in: int = 0  # bytes committed into the tier: puts, demotions and promotions in
    # Bytes read out of the tier: gets served and demotions written below (a promotion copies
    # its get's bytes, and an unwritten demotion reads none).
    bytes_out: int = 0
    unavailable: int = 0  # operations failed at once because the tier's server was down
    fetched: int = 0  # gets served from shared storage beyond the index (another store's entry)

    def count(self, event: str) -> None:
        setattr(self, event, getattr(self, event) + 1)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class EngineCounters:
    """Prefix lookups of the engines on one store (``KVCacheEngine.lookup``) since it opened."""

    lookups: int = 0
    tokens: int = 0  # tokens the lookups asked about
    hit_tokens: Counter[str] = field(default_factory=Counter)  # leading tokens found, by tier

    def as_dict(self) -> dict[str, object]:
        return {"lookups": self.lookups, "tokens": self.tokens, "hit_tokens": dict(self.hit_tokens)}
