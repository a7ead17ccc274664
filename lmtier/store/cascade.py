"""The ordered tiers as one index: where a key is, and the ``Hit`` a lookup returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmtier.admission import Admission, AdmitAll
from lmtier.keys import KeyLike
from lmtier.tiers.base import Tier

__all__ = ["Cascade", "Hit"]


@dataclass(frozen=True, slots=True)
class Hit:
    """Where a key's entry was found: the tier's position, the tier, its stored object."""

    index: int
    tier: Tier
    obj: Any

    def current(self, key: KeyLike) -> bool:
        """Whether the tier still holds this very object under ``key``."""
        return self.tier.lookup(key) is self.obj


class Cascade:
    """The store's tiers, top (fastest) first, asked as one index."""

    __slots__ = ("observers", "shared", "tiers")

    def __init__(self, tiers: list[Tier]) -> None:
        self.tiers = tiers  # the store's own list, not a copy
        #: Whether a miss asks a shared tier's storage.
        self.shared = any(tier.shared for tier in self.tiers)
        #: Admission policies that learn from hits (admitting everything learns nothing).
        self.observers: list[Admission] = [
            t.admission for t in self.tiers if not isinstance(t.admission, AdmitAll)
        ]

    def find(self, key: KeyLike) -> Hit | None:
        """The key's authoritative entry, top-down; each tier passed over counts a miss."""
        for index, tier in enumerate(self.tiers):
            obj = tier.lookup(key)
            if obj is not None:
                return Hit(index, tier, obj)
            tier.record_miss()
        return None

    def holder(self, key: KeyLike) -> Tier | None:
        """The tier of ``key``'s authoritative entry (the highest holding it), or None."""
        for tier in self.tiers:  # a plain loop: this runs on every put and move
            if tier.lookup(key) is not None:
                return tier
        return None

    def below(self, tier: Tier) -> list[Tier]:
        return self.tiers[self.tiers.index(tier) + 1 :]

    def source(self, tier: Tier, obj: Any) -> Hit:
        """``obj`` in ``tier`` as the source of a move."""
        return Hit(self.tiers.index(tier), tier, obj)

    def still_current(self, key: KeyLike, source: Hit, into: Tier | None = None) -> bool:
        """Whether a move of ``key`` from ``source`` may still commit (into ``into``): the source
        still holds that object as the key's authoritative entry, and the destination no copy."""
        if not source.current(key) or self.holder(key) is not source.tier:
            return False
        return into is None or into.lookup(key) is None

    @staticmethod
    def clean_copy_below(key: KeyLike, below: Sequence[Tier]) -> Tier | None:
        """A tier below holding a clean copy of ``key`` that is staying (not itself a victim)."""
        return next((t for t in below if t.lookup(key) is not None and not t.is_leaving(key)), None)

    def remove_everywhere(self, key: KeyLike) -> list[tuple[Tier, Any]]:
        """Take ``key`` out of every tier; the tiers and objects that held it."""
        removed = []
        for tier in self.tiers:
            obj = tier.remove(key)
            if obj is not None:
                removed.append((tier, obj))
        return removed

    def keys(self) -> list[KeyLike]:
        """Every key some tier holds, each once, top tier's first."""
        seen: dict[KeyLike, None] = {}
        for tier in self.tiers:
            seen.update(dict.fromkeys(tier.keys()))
        return list(seen)

    def audit_copies(self) -> list[str]:
        """Copies of a key whose size differs from its authoritative entry's, as messages."""
        problems = []
        first: dict[KeyLike, tuple[Tier, int]] = {}
        for tier in self.tiers:
            for key, size in tier.entry_sizes():
                if key not in first:
                    first[key] = (tier, size)
                elif first[key][1] != size:
                    holder, expected = first[key]
                    problems.append(
                        f"{key!r}: the copy in {tier.name} has {size} bytes, "
                        f"the entry in {holder.name} {expected}"
                    )
        return problems
