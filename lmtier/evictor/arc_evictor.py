"""ARC (Megiddo and Modha, FAST'03) with ghost lists, adapted to entries of different sizes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from lmtier.evictor.keyed import KeyedEvictor
from lmtier.keys import KeyLike

__all__ = ["ARCEvictor"]


class ARCEvictor(KeyedEvictor):
    """Recency list T1 and frequency list T2, ghosts B1 and B2, target ``p`` for T1 — in bytes.

    A ghost hit in B1 (T1 evicted too early) raises ``p`` by the entry's size times
    max(1, |B2|/|B1|); one in B2 lowers it symmetrically; victims come from T1 while it
    exceeds ``p``, else from T2.  Ghosts are trimmed so that T1+B1 <= c and all four <= 2c.
    """

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._t1: OrderedDict[KeyLike, None] = OrderedDict()
        self._t2: OrderedDict[KeyLike, None] = OrderedDict()
        self._b1: OrderedDict[KeyLike, int] = OrderedDict()  # key -> size
        self._b2: OrderedDict[KeyLike, int] = OrderedDict()
        self._t1_bytes = self._t2_bytes = self._b1_bytes = self._b2_bytes = 0
        self._p = 0.0

    @property
    def target(self) -> float:
        """``p``: the bytes T1 (entries used once since they arrived) may hold."""
        return self._p

    def _adapted(self, key: KeyLike | None, size: int) -> float:
        """``p`` after a put of ``key``: moved toward the list whose ghost remembers it."""
        capacity = float(self._capacity or 0)
        if key in self._b1:
            step = size * max(1.0, self._b2_bytes / max(self._b1_bytes, 1))
            return min(capacity, self._p + step)
        if key in self._b2:
            step = size * max(1.0, self._b1_bytes / max(self._b2_bytes, 1))
            return max(0.0, self._p - step)
        return self._p

    def _insert(self, key: KeyLike, size: int, position: int | None) -> None:
        self._p = self._adapted(key, size)
        if key in self._b1:
            self._b1_bytes -= self._b1.pop(key)
            self._t2[key] = None
            self._t2_bytes += size
        elif key in self._b2:
            self._b2_bytes -= self._b2.pop(key)
            self._t2[key] = None
            self._t2_bytes += size
        else:
            self._t1[key] = None
            self._t1_bytes += size
        self._trim_ghosts()

    def _hit(self, key: KeyLike) -> None:
        size = self._size_of(key)
        if key in self._t1:
            del self._t1[key]
            self._t1_bytes -= size
            self._t2[key] = None
            self._t2_bytes += size
        else:
            self._t2.move_to_end(key)

    def _remove(self, key: KeyLike) -> None:
        size = self._size_of(key)
        if key in self._t1:
            del self._t1[key]
            self._t1_bytes -= size
        else:
            del self._t2[key]
            self._t2_bytes -= size

    def _select(
        self, need: int, cache_dict: OrderedDict[Any, Any], key: KeyLike | None
    ) -> list[KeyLike] | None:
        size = 0 if key is None else self._size_of_ghost(key)
        p = self._adapted(key, size)
        in_b2 = key is not None and key in self._b2
        t1_bytes = self._t1_bytes
        prefer_t1 = t1_bytes > 0 and (t1_bytes > p or (in_b2 and t1_bytes >= p))
        pins, sizes = self._pins, self._sizes
        for head in self._t1 if prefer_t1 else self._t2:  # the common case: one victim
            if head not in pins and head in cache_dict and sizes[head] >= need:
                self._retire(head, prefer_t1)
                return [head]
            break
        from_t1 = self._evictables(self._t1, cache_dict)
        from_t2 = self._evictables(self._t2, cache_dict)
        victims: list[tuple[KeyLike, bool]] = []
        freed = 0
        while freed < need:
            prefer_t1 = t1_bytes > 0 and (t1_bytes > p or (in_b2 and t1_bytes >= p))
            first, second = (from_t1, from_t2) if prefer_t1 else (from_t2, from_t1)
            victim, in_t1 = next(first, None) or next(second, None) or (None, False)
            if victim is None:
                return None
            victims.append((victim, in_t1))
            freed += self._size_of(victim)
            if in_t1:
                t1_bytes -= self._size_of(victim)
        for victim, in_t1 in victims:
            self._retire(victim, in_t1)
        return [victim for victim, _ in victims]

    def _retire(self, victim: KeyLike, in_t1: bool) -> None:
        """Move a chosen victim from T1 to B1 or from T2 to B2."""
        size = self._size_of(victim)
        if in_t1:
            del self._t1[victim]
            self._t1_bytes -= size
            self._b1[victim] = size
            self._b1_bytes += size
        else:
            del self._t2[victim]
            self._t2_bytes -= size
            self._b2[victim] = size
            self._b2_bytes += size

    def _size_of_ghost(self, key: KeyLike) -> int:
        return self._b1.get(key) or self._b2.get(key) or 0

    def _evictables(
        self, queue: OrderedDict[KeyLike, None], cache_dict: OrderedDict[Any, Any]
    ) -> Iterator[tuple[KeyLike, bool]]:
        in_t1 = queue is self._t1
        return ((k, in_t1) for k in queue if self._evictable(k, cache_dict))

    def _trim_ghosts(self) -> None:
        capacity = self._capacity or 0
        while self._b1 and self._t1_bytes + self._b1_bytes > capacity:
            self._b1_bytes -= self._b1.popitem(last=False)[1]
        while (self._b1 or self._b2) and (
            self._t1_bytes + self._t2_bytes + self._b1_bytes + self._b2_bytes > 2 * capacity
        ):
            ghost = self._b2 if self._b2 else self._b1
            size = ghost.popitem(last=False)[1]
            if ghost is self._b2:
                self._b2_bytes -= size
            else:
                self._b1_bytes -= size
