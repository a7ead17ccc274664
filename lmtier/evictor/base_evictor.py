"""The evictor interface (LMCache-compatible) and the evictor that never evicts."""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Iterable
from enum import Enum, auto
from typing import Any

import torch

from lmtier.errors import ConfigError, LmtierTypeError
from lmtier.keys import KeyLike
from lmtier.metadata import DiskCacheMetadata

__all__ = ["BaseEvictor", "DummyEvictor", "PutStatus"]

GB = 1024**3


class PutStatus(Enum):
    """Whether a put can be stored: ``LEGAL`` (room made) or ``ILLEGAL`` (it cannot fit)."""

    LEGAL = auto()
    ILLEGAL = auto()


class BaseEvictor(metaclass=abc.ABCMeta):
    """Interface for cache evictors: decides which entries leave a cache to make room.

    The caller owns ``cache_dict`` (an ``OrderedDict`` key → stored object) and the data; the
    evictor owns the ordering and a byte counter (its *charge*).  The seed protocol, kept from
    LMCache so that code written against it ports by changing the import:

    * ``update_on_get(key, cache_dict)`` — a use of ``key``; a key not in ``cache_dict`` is a no-op.
    * ``update_on_put(cache_dict, cache_size) -> (evict_keys, status)`` — room for a new entry of
      ``cache_size`` bytes.  ``LEGAL``: ``evict_keys`` are the victims in eviction order, already
      discharged, and ``cache_size`` is charged; the caller removes the victims from
      ``cache_dict`` and inserts the new entry (at the end).  ``ILLEGAL``: nothing changes and
      no victim is returned, because the entry exceeds the budget or the unpinned entries
      cannot free enough room.  ``cache_dict`` itself is never mutated here.
    * ``get_size(kv_obj)`` — bytes of a tensor, a bytes-like object or a ``DiskCacheMetadata``.

    lmtier's extensions (each keeps every seed call working):

    * ``update_on_remove(key, cache_size)`` — an entry left for a reason other than being this
      evictor's victim (deleted, overwritten, moved to another tier, dropped as corrupt) or a
      LEGAL put was abandoned before insertion; discharges ``cache_size`` so the counter never
      drifts.
    * ``pin(key)`` / ``unpin(key)`` / ``is_pinned(key)`` — counted pins; victim selection skips
      pinned keys.
    * ``update_on_put(cache_dict, cache_size, key=None, *, position=None)`` — the key about to be
      inserted and, for a KV-cache chunk, its index in its prefix chain (0 for the first chunk),
      which policies with ghost lists or position awareness use.  Both are optional: called
      seed-style without them, a policy learns the new key from ``cache_dict``'s end at its next
      call.  With a ``key``, the caller may insert it later (the store commits after its
      write), and may keep victims in ``cache_dict`` while they move; a policy never names a key
      that is not in ``cache_dict``, nor one it already named.
    * ``capacity_bytes`` (``None`` when unbounded) and ``charged_bytes``, both readable.

    Subclasses call ``super().__init__(capacity_bytes)`` and charge through ``_charge``.
    """

    def __init__(self, capacity_bytes: int | None = None) -> None:
        if capacity_bytes is not None and (
            isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int)
        ):
            raise ConfigError(f"capacity must be an int of bytes, got {capacity_bytes!r}")
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise ConfigError(f"an evictor's budget must be > 0 bytes, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._charged = 0
        self._pins: dict[KeyLike, int] = {}

    # ----------------------------------------------------------------- seed protocol
    @abc.abstractmethod
    def update_on_get(self, key: KeyLike, cache_dict: OrderedDict[Any, Any]) -> None:
        """Record a use of ``key``; a key that is not in ``cache_dict`` is ignored."""

    @abc.abstractmethod
    def update_on_put(
        self,
        cache_dict: OrderedDict[Any, Any],
        cache_size: int,
        key: KeyLike | None = None,
        *,
        position: int | None = None,
    ) -> tuple[list[KeyLike], PutStatus]:
        """Make room for a new entry of ``cache_size`` bytes; see the class docstring.

        ``key`` (the entry's key) and ``position`` (its chunk index in a prefix chain) are
        lmtier extensions; policies that do not use them ignore them.
        """

    def get_size(self, kv_obj: Any) -> int:
        """Bytes held by ``kv_obj``: a tensor, bytes-like object or ``DiskCacheMetadata``."""
        if isinstance(kv_obj, torch.Tensor):
            return kv_obj.nbytes
        if isinstance(kv_obj, (bytes, bytearray)):
            return len(kv_obj)
        if isinstance(kv_obj, memoryview):
            return kv_obj.nbytes
        if isinstance(kv_obj, DiskCacheMetadata):
            return kv_obj.size
        raise LmtierTypeError(
            f"cannot size a {type(kv_obj).__name__}: expected torch.Tensor, bytes, bytearray, "
            "memoryview or DiskCacheMetadata"
        )

    # ----------------------------------------------------------------- extensions
    @property
    def capacity_bytes(self) -> int | None:
        """The budget in bytes, or ``None`` for an evictor without one."""
        return self._capacity

    @property
    def charged_bytes(self) -> int:
        """Bytes currently charged: entries put and not yet evicted or removed."""
        return self._charged

    def update_on_remove(self, key: KeyLike, cache_size: int) -> None:
        """``key`` (charged ``cache_size`` bytes) left without being this evictor's victim."""
        check_size(cache_size)
        if cache_size > self._charged:
            raise ValueError(
                f"removing {cache_size} bytes for {key!r} but only {self._charged} are charged"
            )
        self._charged -= cache_size
        self._forget(key, cache_size)

    def next_victims(self, cache_dict: OrderedDict[Any, Any], cache_size: int) -> list[KeyLike]:
        """The keys ``update_on_put`` would choose now to fit ``cache_size`` more bytes, in the
        order it would take them, without changing any state (the store copies them to the
        next tier ahead of their eviction: ``write_ahead``).

        The default answers ``[]``: a policy whose choice changes its own state (a clock's
        second chances, a ghost list) cannot tell without choosing.
        """
        return []

    def pin(self, key: KeyLike) -> None:
        """Make ``key`` unevictable until a matching ``unpin``; pins are counted."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: KeyLike) -> None:
        """Release one pin of ``key``."""
        count = self._pins.get(key, 0)
        if count <= 0:
            raise ValueError(f"{key!r} is not pinned")
        if count == 1:
            del self._pins[key]
        else:
            self._pins[key] = count - 1

    def is_pinned(self, key: KeyLike) -> bool:
        return key in self._pins

    # ----------------------------------------------------------------- for subclasses
    def _forget(self, key: KeyLike, cache_size: int) -> None:
        """Hook: drop any per-key state a policy keeps when ``key`` (the copy of it charged
        ``cache_size`` bytes) leaves by removal."""

    def _charge(self, cache_size: int) -> None:
        self._charged += cache_size

    def _pick_victims(
        self, candidates: Iterable[tuple[KeyLike, Any]], cache_size: int
    ) -> tuple[list[KeyLike], PutStatus]:
        """Take unpinned ``(key, obj)`` candidates in order until ``cache_size`` more bytes fit.

        ``update_on_put``'s answer: LEGAL with the victims, already discharged and the new
        entry charged, or ILLEGAL (and no state change) when the entry cannot fit.
        """
        check_size(cache_size)
        if self._capacity is None:
            self._charge(cache_size)
            return [], PutStatus.LEGAL
        chosen = self._victims_among(candidates, cache_size)
        if chosen is None:
            return [], PutStatus.ILLEGAL
        victims, freed = chosen
        self._charged += cache_size - freed
        return victims, PutStatus.LEGAL

    def _victims_among(
        self, candidates: Iterable[tuple[KeyLike, Any]], cache_size: int
    ) -> tuple[list[KeyLike], int] | None:
        """The unpinned candidates, in order, whose bytes make ``cache_size`` more fit, and
        those bytes; None when they cannot.  Changes nothing."""
        capacity = self._capacity
        if capacity is None:
            return [], 0
        if cache_size > capacity:
            return None
        need = self._charged + cache_size - capacity
        victims: list[KeyLike] = []
        freed = 0
        if need > 0:
            for key, obj in candidates:
                if key in self._pins:
                    continue
                victims.append(key)
                freed += self.get_size(obj)
                if freed >= need:
                    break
            else:
                return None
        return victims, freed


class DummyEvictor(BaseEvictor):
    """Never evicts: every put is LEGAL and only counted."""

    def __init__(self) -> None:
        super().__init__(None)

    def update_on_get(self, key: KeyLike, cache_dict: OrderedDict[Any, Any]) -> None:
        """Uses change nothing."""

    def update_on_put(
        self,
        cache_dict: OrderedDict[Any, Any],
        cache_size: int,
        key: KeyLike | None = None,
        *,
        position: int | None = None,
    ) -> tuple[list[KeyLike], PutStatus]:
        """Charge ``cache_size``; no victims."""
        check_size(cache_size)
        self._charge(cache_size)
        return [], PutStatus.LEGAL


def check_size(cache_size: int) -> None:
    """Raise ``ValueError`` unless ``cache_size`` is an int >= 0."""
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
        raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
