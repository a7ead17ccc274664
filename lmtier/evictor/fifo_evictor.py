"""First-in first-out eviction, ordered by the caller's ``OrderedDict``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from lmtier.evictor.base_evictor import BaseEvictor, PutStatus
from lmtier.keys import KeyLike

__all__ = ["FIFOEvictor"]


class FIFOEvictor(BaseEvictor):
    """FIFO over ``cache_dict``'s insertion order: victims oldest first; gets change nothing."""

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)

    def update_on_get(self, key: KeyLike, cache_dict: OrderedDict[Any, Any]) -> None:
        """Uses do not reorder."""

    def update_on_put(
        self,
        cache_dict: OrderedDict[Any, Any],
        cache_size: int,
        key: KeyLike | None = None,
        *,
        position: int | None = None,
    ) -> tuple[list[KeyLike], PutStatus]:
        """Victims oldest first, skipping pinned keys, until ``cache_size`` fits."""
        return self._pick_victims(cache_dict.items(), cache_size)
