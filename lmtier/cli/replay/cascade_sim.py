"""The store's cascade without data: the same evictors decide, sizes stand in for tensors.

Sequential and synchronous, it makes the decisions ``TieredStore`` makes for the same
sequence of gets and puts (demotion of victims, promotion of lower hits leaving clean copies
below, drops at the bottom), fast enough to replay a whole trace.  Its tiers are ``Tier``s
whose entries are sizes: each placement goes through the tier's own steps (``Placing``, as
a slot does in the store), and the tier counts its events itself.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtier.admission import make_admission
from lmtier.evictor import make_evictor
from lmtier.keys import KeyLike
from lmtier.metadata import DiskCacheMetadata
from lmtier.tiers.base import Arrival, Tier
from lmtier.tiers.placing import Placing

__all__ = ["CascadeSim", "SimTier"]


def _sized(size: int) -> DiskCacheMetadata:
    """A distinct object that ``get_size`` reads as ``size`` bytes, holding no data."""
    return DiskCacheMetadata("", size)


class SimTier(Tier):
    """A tier that stores sizes, not bytes: its evictor and admission policy decide as a real
    tier's would."""

    def __init__(
        self,
        name: str,
        capacity: int,
        policy: str = "lru",
        admission: str = "all",
        admission_window: int | None = None,
    ) -> None:
        super().__init__(name, make_evictor(policy, capacity))
        self.admission = make_admission(admission, capacity, admission_window)

    @property
    def home_device(self) -> torch.device:
        return torch.device("cpu")

    async def _write(self, key: KeyLike, tensor: torch.Tensor) -> DiskCacheMetadata:
        return _sized(tensor.nbytes)

    async def load(self, obj: Any) -> torch.Tensor | None:
        return None  # no data behind a size

    async def discard(self, obj: Any) -> None:
        """Nothing to release."""


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
            obj = tier.lookup(key)
            if obj is None:
                tier.record_miss()
                continue
            size = tier.record_hit(key, obj)
            for each in self.tiers:
                each.admission.observe(key, size)
            if index and self.promote_on_hit:
                source = (tier, obj)
                if self._place(key, size, 0, index, source, Arrival.PROMOTION):
                    tier.record_promoted()
            return index
        return None

    def put(self, key: Any, size: int, position: int | None = None) -> bool:
        """Store ``key`` (chunk ``position`` of its prefix, if known) in the first tier that
        takes it, replacing it wherever it was."""
        if position is not None:
            self.positions[key] = position
        return self._place(key, size, 0, len(self.tiers), None, Arrival.PUT)

    def _place(
        self,
        key: Any,
        size: int,
        start: int,
        stop: int,
        source: tuple[SimTier, DiskCacheMetadata] | None,
        arrival: Arrival,
    ) -> bool:
        for index in range(start, stop):
            tier = self.tiers[index]
            if size > tier.budget:  # the store never offers a tier what cannot fit it
                continue
            if not tier.admits(key, size):
                continue
            with Placing(tier, key, size, arrival, self.positions.get(key)) as placing:
                if placing.victims is None:
                    continue
                # As in the store, the victims move down before the new entry commits.
                for victim, obj in placing.victims:
                    tier.remove(victim)
                    self._demote(index, victim, obj)
                if source is None:
                    for other in self.tiers:
                        other.remove(key)
                else:
                    src_tier, src_obj = source
                    if src_tier.lookup(key) is not src_obj:  # it moved meanwhile: stale
                        return False
                    if not self.clean_copies:  # else the source stays, a clean copy
                        src_tier.remove(key)
                # Its victims gone, the tier has the room its evictor promised.
                if not placing.reserve_now():
                    raise RuntimeError(f"tier {tier.name!r} has no room after its victims left")
                placing.commit(_sized(size))
                return True
        return False

    def _demote(self, index: int, key: Any, obj: DiskCacheMetadata) -> None:
        """Place a victim (already out of tier ``index``) lower down, or drop it; a clean copy
        goes without a move, and an entry with a clean copy below hands over to it."""
        tier = self.tiers[index]
        if any(above.lookup(key) is not None for above in self.tiers[:index]):
            tier.record_copy_evicted()
        elif any(below.lookup(key) is not None for below in self.tiers[index + 1 :]):
            tier.record_handed_over()
        elif self._place(key, obj.size, index + 1, len(self.tiers), None, Arrival.DEMOTION):
            tier.record_demoted(obj)
        else:
            tier.record_drop()
