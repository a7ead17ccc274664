"""S3-FIFO (Yang et al., SOSP'23): a small FIFO filters one-hit entries, a main FIFO reinserts."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from lmtier.evictor.keyed import KeyedEvictor
from lmtier.keys import KeyLike

__all__ = ["S3FIFOEvictor"]

_MAX_FREQ = 3  # two bits, as in the paper


class S3FIFOEvictor(KeyedEvictor):
    """Small (10% of the bytes), main and ghost FIFOs; lazy promotion, quick demotion.

    A new key enters the small queue, or the main queue if the ghost remembers it.  A small
    queue entry used at least once moves to main at eviction time, otherwise it leaves and its
    key joins the ghost (bounded by main's share of the bytes).  A main entry with uses left is
    reinserted with one use fewer.
    """

    def __init__(self, capacity_bytes: int, small_fraction: float = 0.1) -> None:
        super().__init__(capacity_bytes)
        self._small_target = small_fraction * capacity_bytes
        self._ghost_limit = capacity_bytes - self._small_target
        self._small: OrderedDict[KeyLike, None] = OrderedDict()
        self._main: OrderedDict[KeyLike, None] = OrderedDict()
        self._ghost: OrderedDict[KeyLike, int] = OrderedDict()  # key -> size
        self._freq: dict[KeyLike, int] = {}
        self._small_bytes = 0
        self._ghost_bytes = 0

    def _insert(self, key: KeyLike, size: int, position: int | None) -> None:
        self._freq[key] = 0
        if key in self._ghost:
            self._ghost_bytes -= self._ghost.pop(key)
            self._main[key] = None
        else:
            self._small[key] = None
            self._small_bytes += size

    def _hit(self, key: KeyLike) -> None:
        self._freq[key] = min(self._freq[key] + 1, _MAX_FREQ)

    def _remove(self, key: KeyLike) -> None:
        del self._freq[key]
        if key in self._small:
            del self._small[key]
            self._small_bytes -= self._size_of(key)
        else:
            del self._main[key]

    def _select(
        self, need: int, cache_dict: OrderedDict[Any, Any], key: KeyLike | None
    ) -> list[KeyLike] | None:
        small, main, freq = self._small, self._main, self._freq
        if self._small_bytes > self._small_target:  # the common case: an unused small head
            for head in small:
                if (
                    not freq[head]
                    and head not in self._pins
                    and head in cache_dict
                    and self._size_of(head) >= need
                ):
                    del small[head], freq[head]
                    size = self._size_of(head)
                    self._small_bytes -= size
                    self._ghost[head] = size
                    self._ghost_bytes += size
                    while self._ghost_bytes > self._ghost_limit:
                        self._ghost_bytes -= self._ghost.popitem(last=False)[1]
                    return [head]
                break
        victims: list[tuple[KeyLike, bool, int]] = []  # (key, from small, freq)
        freed = 0
        # Every entry is looked at a bounded number of times (freq <= 3, a skip per queue pass).
        # The skip counts are of unevictable heads in a row: a queue is given up on only once
        # a whole pass met nothing but pinned or not yet inserted entries.
        steps = (_MAX_FREQ + 3) * (len(small) + len(main)) + 4
        skipped_small = skipped_main = 0
        while freed < need and steps > 0:
            steps -= 1
            use_small = small and skipped_small < len(small)
            if use_small and self._small_bytes <= self._small_target:
                use_small = not (main and skipped_main < len(main))
            if use_small:
                head = next(iter(small))
                if not self._evictable(head, cache_dict):
                    small.move_to_end(head)
                    skipped_small += 1
                    continue
                skipped_small = 0
                if freq[head] >= 1:
                    del small[head]
                    self._small_bytes -= self._size_of(head)
                    main[head] = None
                    freq[head] = 0
                else:
                    del small[head]
                    self._small_bytes -= self._size_of(head)
                    victims.append((head, True, 0))
                    freed += self._size_of(head)
            elif main and skipped_main < len(main):
                head = next(iter(main))
                if not self._evictable(head, cache_dict):
                    main.move_to_end(head)
                    skipped_main += 1
                    continue
                skipped_main = 0
                if freq[head] > 0:
                    freq[head] -= 1
                    main.move_to_end(head)
                else:
                    del main[head]
                    victims.append((head, False, 0))
                    freed += self._size_of(head)
            else:
                break
        if freed < need:
            # Rare (entries admitted but not yet inserted stand in the way): put victims back.
            for victim, from_small, count in reversed(victims):
                queue = small if from_small else main
                queue[victim] = None
                queue.move_to_end(victim, last=False)
                if from_small:
                    self._small_bytes += self._size_of(victim)
                freq[victim] = count
            return None
        for victim, from_small, _ in victims:
            del freq[victim]
            if from_small:
                self._ghost[victim] = self._size_of(victim)
                self._ghost_bytes += self._size_of(victim)
        while self._ghost_bytes > self._ghost_limit:
            self._ghost_bytes -= self._ghost.popitem(last=False)[1]
        return [victim for victim, _, _ in victims]
