"""Least-recently-used eviction, ordered by the caller's ``OrderedDict``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from lmtier.errors import ConfigError
from lmtier.evictor.base_evictor import GB, BaseEvictor, PutStatus
from lmtier.keys import KeyLike

__all__ = ["LRUEvictor"]


class LRUEvictor(BaseEvictor):
    """LRU over ``cache_dict``'s order: a get moves the key to the end, victims come from the front.

    ``max_cache_size`` is the budget in GB (1 GB = 1024**3 bytes), as in LMCache;
    ``max_cache_bytes`` gives it in bytes instead.
    """

    def __init__(self, max_cache_size: float = 10.0, *, max_cache_bytes: int | None = None) -> None:
        if max_cache_bytes is None:
            if isinstance(max_cache_size, bool) or not isinstance(max_cache_size, (int, float)):
                raise ConfigError(f"max_cache_size must be a number of GB, got {max_cache_size!r}")
            max_cache_bytes = int(max_cache_size * GB)
            if max_cache_size > 0 and max_cache_bytes == 0:
                raise ConfigError(f"max_cache_size={max_cache_size} GB is below one byte")
        super().__init__(max_cache_bytes)

    @property
    def MAX_CACHE_SIZE(self) -> int:
        """The budget in bytes (LMCache's name)."""
        assert self._capacity is not None
        return self._capacity

    @property
    def current_cache_size(self) -> int:
        """Bytes currently charged (LMCache's name)."""
        return self._charged

    def update_on_get(self, key: KeyLike, cache_dict: OrderedDict[Any, Any]) -> None:
        """Move ``key`` to the most-recent end."""
        if key in cache_dict:
            cache_dict.move_to_end(key)

    def update_on_put(
        self,
        cache_dict: OrderedDict[Any, Any],
        cache_size: int,
        key: KeyLike | None = None,
        *,
        position: int | None = None,
    ) -> tuple[list[KeyLike], PutStatus]:
        """Victims least recent first, skipping pinned keys, until ``cache_size`` fits."""
        return self._pick_victims(cache_dict.items(), cache_size)

    def next_victims(self, cache_dict: OrderedDict[Any, Any], cache_size: int) -> list[KeyLike]:
        """``update_on_put``'s victims for ``cache_size`` bytes, chosen without charging."""
        chosen = self._victims_among(cache_dict.items(), cache_size)
        return [] if chosen is None else chosen[0]
