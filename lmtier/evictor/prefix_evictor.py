"""A prefix-aware policy for KV-cache chunks: one-hit filtering, head chunks kept longer."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from lmtier.evictor.keyed import KeyedEvictor
from lmtier.keys import KeyLike

__all__ = ["PrefixEvictor"]

_CLASSES = 8  # position classes: 0, 1, 2-3, 4-7, ..., 64 and beyond
_USES = 3  # use levels in the protected part: none yet, one, two or more


class PrefixEvictor(KeyedEvictor):
    """Probation FIFO with a long ghost (S3-FIFO's filter), protected LRU lists by chunk position
    and use count, and an ARC-style byte target for probation.

    * A new chunk enters probation unless a ghost remembers it.  A chunk used in probation moves
      at once to the protected part; one that leaves probation unused joins the probation
      ghost, which remembers ``ghost`` times the budget: a chunk asked for again within that
      reach skips probation.  Most chunks are used once, and are filtered there.
    * The protected part is one LRU list per (position class, use level).  The victim is the
      head of the list whose last use plus a bonus is oldest; the bonus grows toward position 0
      (``head_bonus``) and with uses (``use_bonus``), both in budgets (the clock counts bytes).  A
      prefix cache can use hits only up to a request's first miss, so losing a head chunk
      wastes every chunk behind it; and a request uses its chunks in chain order, so plain LRU
      would evict the head first.  Chunks of unknown position share class 0.
    * Probation's target adapts as ARC's ``p`` (``gain`` times the entry's size a step): up
      on a probation-ghost hit that a probation holding all the room would have kept, down on a
      hit in the ghost of protected victims.  Small budgets stay filtered; large ones drift
      toward recency.

    The defaults were tuned on the first half (by request order) of a Mooncake conversation
    trace at 1-25% of its footprint.
    """

    def __init__(
        self,
        capacity_bytes: int,
        probation: float = 0.02,
        ghost: float = 4.0,
        head_bonus: float = 1.0,
        use_bonus: float = 2.0,
        gain: float = 4.0,
        bounds: tuple[float, float] = (0.02, 0.9),
        adapt: bool = True,
    ) -> None:
        super().__init__(capacity_bytes)
        self._target = probation * capacity_bytes
        self._bounds = (bounds[0] * capacity_bytes, bounds[1] * capacity_bytes)
        self._ghost_limits = (ghost * capacity_bytes, float(capacity_bytes))
        # The clock counts bytes used, so a bonus of k budgets lets an entry outlive another by
        # about k turnovers of the cache.
        self._bonus = [
            capacity_bytes * (head_bonus * (_CLASSES - 1 - cls) / (_CLASSES - 1) + use_bonus * uses)
            for cls in range(_CLASSES)
            for uses in range(_USES)
        ]
        self._gain = gain if adapt else 0.0
        self._clock = 0
        self._probation: OrderedDict[KeyLike, None] = OrderedDict()
        self._probation_bytes = 0
        self._lists: list[OrderedDict[KeyLike, int]] = [
            OrderedDict() for _ in range(_CLASSES * _USES)
        ]
        self._class: dict[KeyLike, int] = {}
        self._list: dict[KeyLike, int] = {}  # protected key -> index of its list
        # (head's last use + its list's bonus, list index, tie-break, head) for every non-empty
        # list, plus stale entries dropped as they surface: the oldest score in O(log lists).
        self._heads: list[tuple[float, int, int, KeyLike]] = []
        self._pushes = 0
        # Ghosts, key -> size: [0] left probation unused, [1] left the protected part.
        self._ghosts: tuple[OrderedDict[KeyLike, int], OrderedDict[KeyLike, int]] = (
            OrderedDict(),
            OrderedDict(),
        )
        self._ghost_bytes = [0, 0]
        self._out = 0  # bytes that have left probation so far
        self._left_at: dict[KeyLike, int] = {}  # probation ghost key -> ``_out`` as it left

    @property
    def probation_target(self) -> float:
        """Bytes probation may hold before victims come from it."""
        return self._target

    @staticmethod
    def position_class(position: int | None) -> int:
        """0 for the first chunk (and unknown positions), 1 for the second, then one a
        doubling."""
        return 0 if position is None else min(position.bit_length(), _CLASSES - 1)

    def _insert(self, key: KeyLike, size: int, position: int | None) -> None:
        self._clock += size
        self._class[key] = 0 if position is None else min(position.bit_length(), _CLASSES - 1)
        ghosts = self._ghosts
        which = 0 if key in ghosts[0] else 1 if key in ghosts[1] else -1
        if which < 0:  # the common case: a chunk never seen, or forgotten
            self._probation[key] = None
            self._probation_bytes += size
            return
        self._ghost_bytes[which] -= ghosts[which].pop(key)
        self._adapt_target(size, which, self._left_at.pop(key, None))
        self._protect(key, 0)

    def _adapt_target(self, size: int, which: int, left_at: int | None) -> None:
        # The probation ghost reaches far back to filter admissions; only a hit that a
        # probation holding every byte of the budget would have kept asks for more probation.
        if which == 0:
            capacity = self._capacity or 0
            if left_at is None or self._out - left_at > capacity - self._target:
                return
            step = self._gain * size
        else:
            step = -self._gain * size
        low, high = self._bounds
        self._target = min(high, max(low, self._target + step))

    def _protect(self, key: KeyLike, uses: int) -> None:
        index = self._class[key] * _USES + min(uses, _USES - 1)
        stamped = self._lists[index]
        stamped[key] = self._clock
        self._list[key] = index
        if len(stamped) == 1:
            self._push_head(index)

    def _unlist(self, key: KeyLike) -> int:
        """Take a protected key out of its list; the list's index."""
        index = self._list.pop(key)
        stamped = self._lists[index]
        was_head = next(iter(stamped)) == key
        del stamped[key]
        if was_head and stamped:
            self._push_head(index)
        return index

    def _head_entry(self, index: int) -> tuple[float, int, int, KeyLike]:
        stamped = self._lists[index]
        head = next(iter(stamped))
        self._pushes += 1
        return stamped[head] + self._bonus[index], index, self._pushes, head

    def _push_head(self, index: int) -> None:
        heapq.heappush(self._heads, self._head_entry(index))
        if len(self._heads) > 4 * len(self._lists):  # mostly stale: rebuild from the lists
            self._heads = [self._head_entry(i) for i, lst in enumerate(self._lists) if lst]
            heapq.heapify(self._heads)

    def _oldest_protected(self) -> KeyLike | None:
        """The protected key whose last use plus its list's bonus is oldest."""
        heads, lists, bonus = self._heads, self._lists, self._bonus
        while heads:
            score, index, _, head = heads[0]
            stamped = lists[index]
            if stamped and next(iter(stamped)) == head and stamped[head] + bonus[index] == score:
                return head
            heapq.heappop(heads)
        return None

    def _hit(self, key: KeyLike) -> None:
        self._clock += self._size_of(key)
        if key in self._probation:
            del self._probation[key]
            self._probation_bytes -= self._size_of(key)
            self._protect(key, 0)
        else:
            self._protect(key, self._unlist(key) % _USES + 1)

    def _remove(self, key: KeyLike) -> None:
        if key in self._probation:
            del self._probation[key]
            self._probation_bytes -= self._size_of(key)
        else:
            self._unlist(key)
        del self._class[key]

    def _protected_order(self, cache_dict: OrderedDict[Any, Any]) -> Iterator[KeyLike]:
        """Evictable protected keys, oldest last use plus bonus first (a merge of the lists)."""
        bonus = self._bonus
        iters = {i: iter(lst.items()) for i, lst in enumerate(self._lists) if lst}
        heads = {i: next(it) for i, it in iters.items()}
        while heads:
            best = min(heads, key=lambda i: heads[i][1] + bonus[i])
            key = heads[best][0]
            following = next(iters[best], None)
            if following is None:
                del heads[best]
            else:
                heads[best] = following
            if self._evictable(key, cache_dict):
                yield key

    def _select(
        self, need: int, cache_dict: OrderedDict[Any, Any], key: KeyLike | None
    ) -> list[KeyLike] | None:
        pins, sizes = self._pins, self._sizes
        if self._probation_bytes > self._target:  # the common case, one victim: no generators
            for head in self._probation:
                if head not in pins and head in cache_dict:
                    if sizes[head] >= need:
                        self._retire(head, True)
                        return [head]
                    break
        else:  # likewise out of the protected part: the head with the oldest score
            best = self._oldest_protected()
            if best is not None and best not in pins and best in cache_dict and sizes[best] >= need:
                self._retire(best, False)
                return [best]
        probation = iter(self._probation)
        protected: Iterator[KeyLike] | None = None  # the merge is built only when needed
        probation_bytes = self._probation_bytes
        victims: list[KeyLike] = []
        from_probation: list[bool] = []
        freed = 0
        while freed < need:
            victim: KeyLike | None = None
            if probation_bytes > self._target:
                victim = next((k for k in probation if k not in pins and k in cache_dict), None)
            in_probation = victim is not None
            if victim is None:
                if protected is None:
                    protected = self._protected_order(cache_dict)
                victim = next(protected, None)
            if victim is None:
                victim = next((k for k in probation if k not in pins and k in cache_dict), None)
                in_probation = True
                if victim is None:
                    return None
            victims.append(victim)
            from_probation.append(in_probation)
            size = sizes[victim]
            freed += size
            if in_probation:
                probation_bytes -= size
        for victim, in_probation in zip(victims, from_probation, strict=True):
            self._retire(victim, in_probation)
        return victims

    def _retire(self, victim: KeyLike, in_probation: bool) -> None:
        """Move a chosen victim from its queue to its ghost."""
        size = self._sizes[victim]
        del self._class[victim]
        if in_probation:
            del self._probation[victim]
            self._probation_bytes -= size
            self._out += size
            self._left_at[victim] = self._out
            which = 0
        else:
            self._unlist(victim)
            which = 1
        ghost = self._ghosts[which]
        ghost[victim] = size
        ghost_bytes = self._ghost_bytes[which] + size
        limit = self._ghost_limits[which]
        while ghost_bytes > limit:
            old, old_size = ghost.popitem(last=False)
            ghost_bytes -= old_size
            if which == 0:
                self._left_at.pop(old, None)
        self._ghost_bytes[which] = ghost_bytes
