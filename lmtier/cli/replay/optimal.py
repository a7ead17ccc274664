"""The offline optimum (Belady's MIN, every block inserted) and the infinite-cache ceiling."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

__all__ = ["belady_hits", "ceiling_hits"]


def belady_hits(refs: Sequence[int], capacity: int) -> int:
    """Hits of a cache of ``capacity`` equal-size blocks that always evicts the block used
    farthest in the future; every missed block is inserted."""
    if capacity <= 0:
        return 0
    never = len(refs)
    next_use = [never] * len(refs)
    last_seen: dict[int, int] = {}
    for i in range(len(refs) - 1, -1, -1):
        next_use[i] = last_seen.get(refs[i], never)
        last_seen[refs[i]] = i
    cached: dict[int, int] = {}  # block -> its next use
    farthest: list[tuple[int, int]] = []  # (-next use, block); stale pairs are skipped
    hits = 0
    for i, block in enumerate(refs):
        if block in cached:
            hits += 1
        elif len(cached) >= capacity:
            while True:
                negative_use, victim = heapq.heappop(farthest)
                if cached.get(victim) == -negative_use:
                    del cached[victim]
                    break
        cached[block] = next_use[i]
        heapq.heappush(farthest, (-next_use[i], block))
    return hits


def ceiling_hits(refs: Sequence[int]) -> int:
    """Hits of an infinite cache: every reference but each block's first."""
    return len(refs) - len(set(refs))
