"""Least-frequently-used eviction, least recent first among equal counts."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from lmtier.evictor.keyed import KeyedEvictor
from lmtier.keys import KeyLike

__all__ = ["LFUEvictor"]


class LFUEvictor(KeyedEvictor):
    """LFU with use counts in buckets (a put counts as the first use); O(log n) per operation."""

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._count: dict[KeyLike, int] = {}
        self._buckets: dict[int, OrderedDict[KeyLike, None]] = {}
        self._heap: list[int] = []  # counts of buckets, possibly stale (bucket since emptied)
        self._in_heap: set[int] = set()

    def _add(self, key: KeyLike, count: int) -> None:
        bucket = self._buckets.get(count)
        if bucket is None:
            bucket = self._buckets[count] = OrderedDict()
            if count not in self._in_heap:
                self._in_heap.add(count)
                heapq.heappush(self._heap, count)
        bucket[key] = None
        self._count[key] = count

    def _discard(self, key: KeyLike) -> int:
        count = self._count.pop(key)
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
        return count

    def _insert(self, key: KeyLike, size: int, position: int | None) -> None:
        self._add(key, 1)

    def _hit(self, key: KeyLike) -> None:
        self._add(key, self._discard(key) + 1)

    def _remove(self, key: KeyLike) -> None:
        self._discard(key)

    def _candidates(self) -> Iterator[KeyLike]:
        """Keys by count, then least recent first, without changing anything."""
        heap = self._heap
        while heap and heap[0] not in self._buckets:
            self._in_heap.discard(heapq.heappop(heap))
        if not heap:
            return
        lowest = heap[0]
        yield from self._buckets[lowest]
        # Past the lowest bucket only when pins or a large entry need more: rare, O(b log b).
        for count in sorted(self._buckets):
            if count != lowest:
                yield from self._buckets[count]

    def _select(
        self, need: int, cache_dict: OrderedDict[Any, Any], key: KeyLike | None
    ) -> list[KeyLike] | None:
        victims: list[KeyLike] = []
        freed = 0
        for candidate in self._candidates():
            if not self._evictable(candidate, cache_dict):
                continue
            victims.append(candidate)
            freed += self._size_of(candidate)
            if freed >= need:
                break
        else:
            return None
        for victim in victims:
            self._discard(victim)
        return victims
