"""What a tier counts: the events the store reports about its entries, and how entries arrive.

``TierEvents`` is a part of ``Tier``: these methods are the only writers of a tier's
``counters`` besides the tier's own write path (admission refusals, evictions, bytes in).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Any

from lmtier.evictor import BaseEvictor
from lmtier.keys import KeyLike
from lmtier.metrics import TierCounters

__all__ = ["Arrival", "TierEvents"]


class Arrival(enum.Enum):
    """How an entry came into a tier; its value names the tier counter it increments."""

    PUT = "puts"
    DEMOTION = "demotions_in"
    PROMOTION = "promotions_in"
    WRITE_AHEAD = "written_ahead"

    @property
    def keeps_source(self) -> bool:
        """Whether the move leaves its source in place (the copy is clean)."""
        return self is Arrival.PROMOTION or self is Arrival.WRITE_AHEAD


class TierEvents:
    """The counted events of a tier (mixed into ``Tier``, which sets these attributes)."""

    counters: TierCounters
    evictor: BaseEvictor
    cache_dict: OrderedDict[KeyLike, Any]

    def touch(self, key: KeyLike) -> None:
        """Record a hit on ``key``."""
        self.counters.hits += 1
        self.evictor.update_on_get(key, self.cache_dict)

    def record_hit(self, key: KeyLike, obj: Any) -> int:
        """A read served from ``key``'s entry ``obj``: a hit, its bytes out; the bytes."""
        self.touch(key)
        size = self.evictor.get_size(obj)
        self.counters.bytes_out += size
        return size

    def record_miss(self) -> None:
        self.counters.misses += 1

    def record_fetch(self, nbytes: int) -> None:
        """A value found in shared storage beyond the index."""
        self.counters.fetched += 1
        self.counters.bytes_out += nbytes

    def record_arrival(self, arrival: Arrival) -> None:
        self.counters.count(arrival.value)

    def record_error(self) -> int:
        """A read or write that failed for the environment; the tier's error count so far."""
        self.counters.errors += 1
        return self.counters.errors

    def record_room_timeout(self) -> None:
        self.counters.room_timeouts += 1

    def record_unservable(self, corrupt: bool) -> None:
        """An entry dropped because its bytes are wrong (``corrupt``) or vanished."""
        self.counters.count("corrupt" if corrupt else "errors")

    def record_demoted(self, obj: Any) -> None:
        """A victim written into a tier below."""
        self.counters.demotions_out += 1
        self.counters.bytes_out += self.evictor.get_size(obj)

    def record_handed_over(self) -> None:
        """A victim whose clean copy below took over: a demotion that wrote nothing."""
        self.counters.demotions_out += 1
        self.counters.unwritten_demotions += 1

    def record_copy_evicted(self) -> None:
        """A victim that was a clean copy of a key held higher: gone without a move."""
        self.counters.copies_evicted += 1

    def record_drop(self) -> None:
        """A victim no tier below took: the key is gone."""
        self.counters.drops += 1

    def record_promoted(self) -> None:
        self.counters.promotions_out += 1
