"""Admission policies: whether a tier takes a chunk at all, asked before its evictor makes room.

An evictor decides *which* entries leave to make room; an admission policy decides whether a
newcomer is worth room in the first place. ``second_hit`` is the filter SSD caches use to spare
their flash: a chunk offered to the tier for the first time is refused and only remembered, and
admitted when it comes back while still remembered — so chunks used once are never written.
Pure bookkeeping: no torch, no asyncio, O(1) per offer.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Hashable

from lmtier.errors import ConfigError

__all__ = [
    "ADMISSION_POLICIES",
    "DEFAULT_WINDOW_FACTOR",
    "Admission",
    "AdmitAll",
    "SecondHit",
    "make_admission",
]

#: The ghost of ``second_hit`` remembers this many times the tier's capacity in entries of the
#: size being offered, unless a window is given.
DEFAULT_WINDOW_FACTOR = 4


class Admission(abc.ABC):
    """Decides whether a tier admits a key offered to it (by a put, demotion or promotion).

    The store asks ``admits(key, size)`` once per offer, before the tier's evictor is asked
    for room; a refusal is final for that offer: the put or move goes on to the next candidate
    tier (a demotion that no lower tier admits is dropped and counted), and the evictor and the
    tier's contents are untouched.  Because asking may change the policy's state (it remembers
    what it was offered), a caller must ask exactly once per offer — never to retry or peek.
    """

    #: The name a tier config uses for this policy.
    name: str = ""

    @abc.abstractmethod
    def admits(self, key: Hashable, size: int) -> bool:
        """Whether the tier takes ``key`` (``size`` bytes), recording the offer."""

    def observe(self, key: Hashable, size: int) -> None:
        """A hit on ``key`` in any tier of the store: evidence of reuse the policy may keep."""


class AdmitAll(Admission):
    """Admits everything: the tier's evictor alone decides."""

    name = "all"

    def admits(self, key: Hashable, size: int) -> bool:
        return True


class SecondHit(Admission):
    """Admits a key offered again while a bounded ghost of recent offers still holds its hash."""

    name = "second_hit"

    def __init__(self, capacity_bytes: int, window: int | None = None) -> None:
        if capacity_bytes <= 0:
            raise ConfigError(f"second_hit needs a budget > 0 bytes, got {capacity_bytes}")
        if window is not None and window <= 0:
            raise ConfigError(f"an admission window must be > 0 entries, got {window}")
        self.capacity_bytes = capacity_bytes
        self.window = window
        # Hashes only: a ghost entry costs a few dozen bytes whatever the key's size.
        self._ghost: OrderedDict[int, None] = OrderedDict()

    def admits(self, key: Hashable, size: int) -> bool:
        # Kept and refreshed when known: an admitted chunk that leaves and comes back soon (a
        # hit promoted up, later demoted again) is still a known reuser.
        return self._remember(hash(key), size)

    def observe(self, key: Hashable, size: int) -> None:
        # A hit above this tier is the second sighting that an offer would otherwise be (the
        # "DRAM hit signal" of CacheLib's reject-first admission): a chunk reused while in
        # memory is admitted the first time it is demoted here.
        self._remember(hash(key), size)

    def _remember(self, digest: int, size: int) -> bool:
        """Note ``digest`` as just seen; whether it was seen before, within the window."""
        ghost = self._ghost
        if digest in ghost:
            ghost.move_to_end(digest)
            return True
        ghost[digest] = None
        limit = self.window or max(1, DEFAULT_WINDOW_FACTOR * self.capacity_bytes // max(size, 1))
        while len(ghost) > limit:  # amortized O(1): each hash is trimmed at most once
            ghost.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._ghost)


#: Policy names as tier configs give them.
ADMISSION_POLICIES = (AdmitAll.name, SecondHit.name)


def make_admission(name: str, capacity_bytes: int, window: int | None = None) -> Admission:
    """The admission policy ``name`` for a tier of ``capacity_bytes`` (``window`` in entries)."""
    if name == AdmitAll.name:
        return AdmitAll()
    if name == SecondHit.name:
        return SecondHit(capacity_bytes, window)
    raise ConfigError(f"unknown admission policy {name!r}; known: {', '.join(ADMISSION_POLICIES)}")
