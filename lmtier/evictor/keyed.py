"""Bookkeeping shared by policies that order keys in structures of their own."""

from __future__ import annotations

import abc
from collections import OrderedDict
from typing import Any

from lmtier.errors import ConfigError
from lmtier.evictor.base_evictor import BaseEvictor, PutStatus, check_size
from lmtier.keys import KeyLike

__all__ = ["KeyedEvictor"]


class KeyedEvictor(BaseEvictor):
    """Base of policies that keep their own queues of keys instead of reordering ``cache_dict``.

    It turns the protocol into four policy hooks and keeps what every such policy needs:

    * the size of each *tracked* key (one charged and not yet a victim or removed);
    * keys of seed-style puts (no ``key`` given): the caller inserts the new entry at the end of
      ``cache_dict``, so the next call finds it there and tracks it (O(1));
    * the tracked bytes that are pinned, so that a put that cannot fit is refused at once,
      without a walk;
    * a key admitted again while still tracked (an overwrite whose old entry is removed only
      after the new one is written, or two puts of one key in flight at once) is held aside as
      another *copy* of the key.  A removal names its copy by size, so it discharges and forgets
      that copy, not whichever was admitted first; a copy's commit is not announced, so before
      choosing victims the tracked copy of such a key is made the one in ``cache_dict`` (the
      only one that can be a victim, and the one whose size a victim frees).  When the tracked
      copy leaves, the next one takes over.

    Subclasses implement:

    * ``_insert(key, size, position)`` — a key just admitted joins the policy's structures.
    * ``_hit(key)`` — a use of a tracked key that is in ``cache_dict``.
    * ``_remove(key)`` — a tracked key leaves for a reason other than being chosen (no ghost).
    * ``_select(need, cache_dict, key)`` — victims freeing at least ``need`` bytes, taken out of
      the policy's structures, each one ``_evictable``; or ``None`` with the structures as they
      were.  ``key`` is the incoming key (``None`` when unknown), for policies with ghosts.

    A victim walk must end: the base refuses a put whose need exceeds the unpinned tracked
    bytes before calling ``_select``, so a walk only fails when entries admitted but not yet
    inserted by the caller stand in the way.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes is None:
            raise ConfigError(f"{type(self).__name__} needs a byte budget")
        super().__init__(capacity_bytes)
        self._sizes: dict[KeyLike, int] = {}
        self._tracked_bytes = 0
        self._pinned_bytes = 0
        self._again: dict[KeyLike, list[tuple[int, int | None]]] = {}
        self._positions: dict[KeyLike, int] = {}  # tracked keys put with a position
        self._unnamed: tuple[int, int | None] | None = None  # a seed-style put not yet seen
        self._dict: OrderedDict[Any, Any] | None = None

    # ----------------------------------------------------------------- hooks
    @abc.abstractmethod
    def _insert(self, key: KeyLike, size: int, position: int | None) -> None:
        """Start ordering ``key`` (``size`` bytes, chunk ``position`` if known)."""

    @abc.abstractmethod
    def _hit(self, key: KeyLike) -> None:
        """Record a use of a tracked key."""

    @abc.abstractmethod
    def _remove(self, key: KeyLike) -> None:
        """Stop ordering ``key``, which left without being a victim."""

    @abc.abstractmethod
    def _select(
        self, need: int, cache_dict: OrderedDict[Any, Any], key: KeyLike | None
    ) -> list[KeyLike] | None:
        """Victims freeing ``need`` bytes, out of the structures; ``None`` and no change if not."""

    # ----------------------------------------------------------------- protocol
    def update_on_get(self, key: KeyLike, cache_dict: OrderedDict[Any, Any]) -> None:
        """A use of ``key``; ignored unless tracked and in ``cache_dict``."""
        self._dict = cache_dict
        if self._unnamed is not None:
            self._sync(cache_dict)
        if key in self._sizes and key in cache_dict:
            self._hit(key)

    def update_on_put(
        self,
        cache_dict: OrderedDict[Any, Any],
        cache_size: int,
        key: KeyLike | None = None,
        *,
        position: int | None = None,
    ) -> tuple[list[KeyLike], PutStatus]:
        """Victims in the policy's order until ``cache_size`` fits; the new key is tracked."""
        if type(cache_size) is not int or cache_size < 0:
            check_size(cache_size)  # raises
        self._dict = cache_dict
        if self._unnamed is not None:
            self._sync(cache_dict)
        if self._again:  # rare: only keys with overlapping puts in flight
            self._settle(cache_dict)
        capacity = self._capacity
        assert capacity is not None
        if cache_size > capacity:
            return [], PutStatus.ILLEGAL
        need = self._charged + cache_size - capacity
        victims: list[KeyLike] = []
        if need > 0:
            if need > self._tracked_bytes - self._pinned_bytes:
                return [], PutStatus.ILLEGAL
            chosen = self._select(need, cache_dict, key)
            if chosen is None:
                return [], PutStatus.ILLEGAL
            victims = chosen
            for victim in victims:
                self._charged -= self._untrack(victim)
                if self._again:
                    self._take_over(victim)
        self._charged += cache_size
        if key is None:
            self._unnamed = (cache_size, position)
        elif key in self._sizes:
            self._again.setdefault(key, []).append((cache_size, position))
        else:
            self._track(key, cache_size, position)
        return victims, PutStatus.LEGAL

    def _forget(self, key: KeyLike, cache_size: int) -> None:
        # update_on_remove has discharged the bytes; a seed-style put is resolved first, so
        # that an abandoned one is not mistaken later for the entry at the end.
        if self._dict is not None:
            self._sync(self._dict)
        self._unnamed = None
        again = self._again.get(key)
        if again:
            # The copy that left is the one of its size: a put of another size abandoned while
            # the tracked copy stays, or the tracked copy itself.  Equal sizes are
            # interchangeable, and an aside copy keeps the tracked one's place in the order.
            for index, (size, _) in enumerate(again):
                if size == cache_size:
                    del again[index]
                    if not again:
                        del self._again[key]
                    return
        if key in self._sizes:
            self._remove(key)
            self._untrack(key)
            self._take_over(key)
        elif again:
            again.pop()
            if not again:
                del self._again[key]

    def pin(self, key: KeyLike) -> None:
        """Pin ``key``, counting its bytes as pinned if tracked."""
        if key not in self._pins and key in self._sizes:
            self._pinned_bytes += self._sizes[key]
        super().pin(key)

    def unpin(self, key: KeyLike) -> None:
        """Release one pin of ``key``."""
        super().unpin(key)
        if key not in self._pins and key in self._sizes:
            self._pinned_bytes -= self._sizes[key]

    # ----------------------------------------------------------------- helpers
    def _evictable(self, key: KeyLike, cache_dict: OrderedDict[Any, Any]) -> bool:
        """Whether ``key`` may be named now: unpinned and already inserted by the caller."""
        return key not in self._pins and key in cache_dict

    def _size_of(self, key: KeyLike) -> int:
        return self._sizes[key]

    def _sync(self, cache_dict: OrderedDict[Any, Any]) -> None:
        self._dict = cache_dict
        if self._unnamed is None:
            return
        size, position = self._unnamed
        self._unnamed = None
        if cache_dict:
            last = next(reversed(cache_dict))
            if last not in self._sizes:
                self._track(last, size, position)

    def _settle(self, cache_dict: OrderedDict[Any, Any]) -> None:
        """Make the tracked copy of each key admitted more than once the one in ``cache_dict``.

        Copies commit in any order (a small write finishes before a large one), and a victim
        must free the bytes of the committed copy.
        """
        for key, again in list(self._again.items()):
            if key not in cache_dict or key not in self._sizes:
                continue
            committed = self.get_size(cache_dict[key])
            tracked = self._sizes[key]
            if committed == tracked:
                continue
            for index, (size, position) in enumerate(again):
                if size == committed:
                    again[index] = (tracked, self._positions.get(key))
                    self._remove(key)
                    self._untrack(key)
                    self._track(key, size, position)
                    break

    def _track(self, key: KeyLike, size: int, position: int | None) -> None:
        self._sizes[key] = size
        if position is not None:
            self._positions[key] = position
        self._tracked_bytes += size
        if key in self._pins:
            self._pinned_bytes += size
        self._insert(key, size, position)

    def _untrack(self, key: KeyLike) -> int:
        size = self._sizes.pop(key)
        self._positions.pop(key, None)
        self._tracked_bytes -= size
        if key in self._pins:
            self._pinned_bytes -= size
        return size

    def _take_over(self, key: KeyLike) -> None:
        """The other copy of a key admitted twice becomes the tracked one."""
        again = self._again.get(key)
        if again:
            size, position = again.pop(0)
            if not again:
                del self._again[key]
            self._track(key, size, position)
