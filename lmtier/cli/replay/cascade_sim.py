"""The store's cascade without data: the same evictors decide, sizes stand in for tensors.

Sequential and synchronous, it makes the decisions ``TieredStore`` makes for the same
sequence of gets and puts (demotion of victims, promotion of lower hits leaving clean copies
below, drops at the bottom), fast enough to replay a whole trace.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from lmtier.admission import make_admission
from lmtier.evictor import PutStatus, make_evictor
from lmtier.metadata import DiskCacheMetadata
from lmtier.metrics import TierCounters

__all__ = ["CascadeSim", "SimTier"]


def _sized(size: int) -> DiskCacheMetadata:
    """A distinct object that ``get_size`` reads as ``size`` bytes, holding no data."""
    return DiskCacheMetadata("", size)


@dataclass
class SimTier:
    name: str
    capacity: int
    policy: str = "lru"
    admission: str = "all"
    admission_window: int | None = None

    def __post_init__(self) -> None:
        self.evictor = make_evictor(self.policy, self.capacity)
        self.admission_policy = make_admission(self.admission, self.capacity, self.admission_window)
        self.cache_dict: OrderedDict[Any, DiskCacheMetadata] = OrderedDict()
        self.counters = TierCounters()


class CascadeSim:
    """Tiers of ``SimTier``, fastest first, moved between as the store moves entries."""

    def __init__(
        self, tiers: list[SimTier], promote_on_hit: bool = True, clean_copies: bool = True
    ) -> None:
        self.tiers = tiers
        self.promote_on_hit = promote_on_hit
        self.clean_copies = clean_copies
        self.positions: dict[Any, int] = {}  # key -> chunk index, travels with demotions

    def get(self, key: Any) -> int | None:
        """The index of the tier that hits ``key`` (then promoted), or None on a miss."""
        for index, tier in enumerate(self.tiers):
            obj = tier.cache_dict.get(key)
            if obj is None:
                tier.counters.misses += 1
                continue
            tier.counters.hits += 1
            tier.counters.bytes_out += obj.size
            tier.evictor.update_on_get(key, tier.cache_dict)
            for each in self.tiers:
                each.admission_policy.observe(key, obj.size)
            if index and self.promote_on_hit:
                source = (tier, obj)
                if self._place(key, obj.size, 0, index, source, "promotions_in"):
                    tier.counters.promotions_out += 1
            return index
        return None

    def put(self, key: Any, size: int, position: int | None = None) -> bool:
        """Store ``key`` (chunk ``position`` of its prefix, if known) in the first tier that
        takes it, replacing it wherever it was."""
        if position is not None:
            self.positions[key] = position
        return self._place(key, size, 0, len(self.tiers), None, "puts")

    def _place(
        self,
        key: Any,
        size: int,
        start: int,
        stop: int,
        source: tuple[SimTier, DiskCacheMetadata] | None,
        arrival: str,
    ) -> bool:
        for index in range(start, stop):
            tier = self.tiers[index]
            if size > tier.capacity:  # the store never offers a tier what cannot fit it
                continue
            if not tier.admission_policy.admits(key, size):
                tier.counters.admission_rejects += 1
                continue
            position = self.positions.get(key)
            victims, status = tier.evictor.update_on_put(
                tier.cache_dict, size, key, position=position
            )
            if status is not PutStatus.LEGAL:
                continue
            tier.counters.evictions += len(victims)
            # As in the store, the victims move down before the new entry commits.
            for victim in victims:
                self._demote(index, victim, tier.cache_dict.pop(victim))
            if source is None:
                for other in self.tiers:
                    old = other.cache_dict.pop(key, None)
                    if old is not None:
                        other.evictor.update_on_remove(key, old.size)
            else:
                src_tier, src_obj = source
                if src_tier.cache_dict.get(key) is not src_obj:  # it moved meanwhile: stale
                    tier.evictor.update_on_remove(key, size)
                    return False
                if not self.clean_copies:  # else the source stays, a clean copy
                    del src_tier.cache_dict[key]
                    src_tier.evictor.update_on_remove(key, size)
            tier.cache_dict[key] = _sized(size)
            tier.counters.count(arrival)
            tier.counters.bytes_in += size
            return True
        return False

    def _demote(self, index: int, key: Any, obj: DiskCacheMetadata) -> None:
        """Place a victim (already out of tier ``index``) lower down, or drop it; a clean copy
        goes without a move, and an entry with a clean copy below hands over to it."""
        tier = self.tiers[index]
        if any(key in above.cache_dict for above in self.tiers[:index]):
            tier.counters.copies_evicted += 1
        elif any(key in below.cache_dict for below in self.tiers[index + 1 :]):
            tier.counters.demotions_out += 1
            tier.counters.unwritten_demotions += 1
        elif self._place(key, obj.size, index + 1, len(self.tiers), None, "demotions_in"):
            tier.counters.demotions_out += 1
            tier.counters.bytes_out += obj.size
        else:
            tier.counters.drops += 1
