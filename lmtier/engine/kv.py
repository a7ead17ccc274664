"""What an engine calls: look up a prompt's cached prefix, retrieve it, store new chunks."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmtier.engine.chunks import ChunkKey, ChunkSpec, token_chunks
from lmtier.errors import InvalidValueError, LmtierTypeError
from lmtier.evictor import PutStatus
from lmtier.keys import CacheEngineKey, KeyLike
from lmtier.store import TieredStore

__all__ = ["DEFAULT_PIN_LEASE_S", "KVCacheEngine", "PrefixLookup", "Tokens"]

log = logging.getLogger(__name__)

#: How long a lookup's pins hold without a retrieve or release (an engine retrieves within
#: its scheduling step; a pin older than this belongs to a request that was dropped).
DEFAULT_PIN_LEASE_S = 30.0

Tokens = Sequence[int] | torch.Tensor


@dataclass(eq=False)
class PrefixLookup:
    """What one ``lookup_pins`` found and pinned: ``tokens`` leading tokens, in the chunks
    ``keys``.  Handed back to ``retrieve(..., pins=)`` or ``release``, it releases exactly
    those pins, once."""

    tokens: int
    keys: tuple[CacheEngineKey, ...]
    asked: CacheEngineKey | None = field(default=None, repr=False)  # last chunk of the tokens
    lease: asyncio.TimerHandle | None = field(default=None, repr=False)
    released: bool = field(default=False, repr=False)


class KVCacheEngine:
    """Chunked prefix caching on a TieredStore.

    KV tensors carry the tokens along ``token_dim`` (2 in the default layout
    ``[num_layers, 2 (K and V), num_tokens, num_kv_heads, head_dim]``); each full chunk of
    ``spec.chunk_size`` tokens is one store entry.  ``lookup`` pins the chunks it counts so that
    they survive until ``retrieve`` or ``release``, or until ``pin_lease_s`` seconds have passed
    (None: no limit), so that a request the engine aborted never holds room for good.

    Pins belong to the lookup that took them: a ``release`` or ``retrieve`` drops one lookup's
    pins and no other's, so a chunk two lookups pinned stays pinned until both let go.  Given
    tokens, it is the oldest live lookup of those tokens, else one whose pinned chunks are
    exactly those tokens' chunks (a retrieve of the prefix a lookup found); given the
    ``PrefixLookup`` that ``lookup_pins`` returned, that lookup.
    """

    def __init__(
        self,
        store: TieredStore,
        spec: ChunkSpec,
        token_dim: int = 2,
        pin_lease_s: float | None = DEFAULT_PIN_LEASE_S,
    ) -> None:
        if pin_lease_s is not None and not pin_lease_s > 0:
            raise InvalidValueError(f"pin_lease_s must be > 0 or None, got {pin_lease_s!r}")
        self._store = store
        self.spec = spec
        self.token_dim = token_dim
        self.pin_lease_s = pin_lease_s
        # The live lookups that pinned something, oldest first: by the last chunk of the
        # tokens they were asked, and by the last chunk they pinned.
        self._by_asked: dict[CacheEngineKey, deque[PrefixLookup]] = {}
        self._by_pinned: dict[CacheEngineKey, deque[PrefixLookup]] = {}
        self.pins_expired = 0

    def chunks(self, tokens: Tokens) -> list[ChunkKey]:
        return token_chunks(self.spec, tokens)

    async def lookup(self, tokens: Tokens) -> int:
        """How many leading tokens are cached (in any tier); those chunks are now pinned.

        Counted in the store's ``metrics.engine``: the tokens asked about, and those found by
        the tier holding their chunk.
        """
        return (await self.lookup_pins(tokens)).tokens

    async def lookup_pins(self, tokens: Tokens) -> PrefixLookup:
        """``lookup``, returning the lookup itself: its token count and the chunks it pinned,
        for ``retrieve(..., pins=)`` or ``release`` to release exactly these pins."""
        chunks = self.chunks(tokens)
        keys: list[CacheEngineKey] = []
        hit = 0
        counters = self._store.metrics.engine
        for chunk in chunks:
            tier = self._store.pin(chunk.key)
            if tier is None:
                break
            keys.append(chunk.key)
            counters.hit_tokens[tier] += chunk.end - chunk.start
            hit = chunk.end
        counters.lookups += 1
        counters.tokens += len(tokens)
        found = PrefixLookup(hit, tuple(keys), asked=chunks[-1].key if chunks else None)
        if keys:
            self._record(found)
        return found

    def _record(self, found: PrefixLookup) -> None:
        assert found.asked is not None
        self._by_asked.setdefault(found.asked, deque()).append(found)
        self._by_pinned.setdefault(found.keys[-1], deque()).append(found)
        if self.pin_lease_s is not None:
            loop = asyncio.get_running_loop()
            found.lease = loop.call_later(self.pin_lease_s, self._expire, found)

    def _expire(self, found: PrefixLookup) -> None:
        if found.released:
            return
        found.lease = None
        self._release(found)
        before, self.pins_expired = self.pins_expired, self.pins_expired + len(found.keys)
        if before == 0 or before // 1000 != self.pins_expired // 1000:
            log.warning(
                "a lookup's pins of %d chunks expired after %.1f s without retrieve or release "
                "(%d pins so far): was the request aborted?",
                len(found.keys),
                self.pin_lease_s,
                self.pins_expired,
            )

    def release(self, lookup: Tokens | PrefixLookup) -> None:
        """Drop one ``lookup``'s pins without retrieving: those of the ``PrefixLookup`` given,
        or of a live lookup of these tokens (see the class docstring)."""
        found = lookup if isinstance(lookup, PrefixLookup) else self._lookup_of(lookup)
        if found is not None:
            self._release(found)

    def _lookup_of(self, tokens: Tokens) -> PrefixLookup | None:
        """The live lookup a release of ``tokens`` ends: the oldest lookup of these tokens, else
        one whose pinned chunks are exactly these tokens' chunks (it pinned them all)."""
        chunks = self.chunks(tokens)
        if not chunks:
            return None
        last = chunks[-1].key
        for index in (self._by_asked, self._by_pinned):
            waiting = index.get(last)
            if waiting and (index is self._by_asked or len(waiting[0].keys) == len(chunks)):
                return waiting[0]
        return None

    def _release(self, found: PrefixLookup) -> None:
        if found.released or not found.keys:  # a lookup that pinned nothing is not recorded
            found.released = True
            return
        found.released = True
        if found.lease is not None:
            found.lease.cancel()
            found.lease = None
        assert found.asked is not None
        for index, key in ((self._by_asked, found.asked), (self._by_pinned, found.keys[-1])):
            waiting = index[key]
            waiting.remove(found)
            if not waiting:
                del index[key]
        for key in found.keys:
            self._store.unpin(key)

    async def store(self, tokens: Tokens, kv: torch.Tensor | Sequence[torch.Tensor]) -> int:
        """Store the chunks of ``tokens`` not cached yet; how many tokens the store now holds.

        ``kv`` is the KV of all ``tokens`` (tokens along ``token_dim``) or one tensor per
        chunk.  One ``put_many`` per call.
        """
        chunks = self.chunks(tokens)
        pieces = self._split(kv, chunks, len(tokens))
        missing = [
            (chunk.key, piece)
            for chunk, piece in zip(chunks, pieces, strict=True)
            if await self._store.contains(chunk.key) is None
        ]
        # A chunk's index in the prefix chain lets position-aware evictors keep heads longer.
        positions: dict[KeyLike, int] = {c.key: index for index, c in enumerate(chunks)}
        statuses = await self._store.put_many(missing, positions=positions)
        stored = {
            key
            for (key, _), status in zip(missing, statuses, strict=True)
            if status is PutStatus.LEGAL
        }
        held = 0
        for chunk in chunks:
            if chunk.key not in stored and await self._store.contains(chunk.key) is None:
                break
            held = chunk.end
        return held

    async def retrieve(
        self,
        tokens: Tokens,
        device: str | torch.device | None = None,
        *,
        pins: PrefixLookup | None = None,
    ) -> tuple[int, torch.Tensor | None]:
        """The cached prefix of ``tokens``: its length and its KV on ``device``.

        Releases the pins of the preceding lookup: ``pins``, or a lookup of these tokens (as
        ``release`` finds it).
        """
        found = pins if pins is not None else self._lookup_of(tokens)
        chunks = self.chunks(tokens)
        try:
            prefix_keys = []
            for chunk in chunks:  # only the cached prefix: chunks after a gap are of no use
                if await self._store.contains(chunk.key) is None:
                    break
                prefix_keys.append(chunk.key)
            got = await self._store.get_many(prefix_keys, device)
        finally:
            if found is not None:
                self._release(found)
        prefix: list[torch.Tensor] = []
        for piece in got:
            if piece is None:
                break
            prefix.append(piece)
        if not prefix:
            return 0, None
        return chunks[len(prefix) - 1].end, torch.cat(prefix, dim=self.token_dim)

    def _split(
        self, kv: torch.Tensor | Sequence[torch.Tensor], chunks: list[ChunkKey], count: int
    ) -> list[torch.Tensor]:
        if isinstance(kv, torch.Tensor):
            if kv.dim() <= self.token_dim or kv.shape[self.token_dim] != count:
                raise InvalidValueError(
                    f"kv of shape {list(kv.shape)} does not hold {count} tokens on dim "
                    f"{self.token_dim}"
                )
            return [kv.narrow(self.token_dim, c.start, c.end - c.start) for c in chunks]
        pieces = list(kv)
        if len(pieces) < len(chunks):
            raise InvalidValueError(f"{len(pieces)} KV chunks for {len(chunks)} token chunks")
        for chunk, piece in zip(chunks, pieces, strict=False):
            if not isinstance(piece, torch.Tensor):
                raise LmtierTypeError(f"a KV chunk must be a tensor, got {type(piece).__name__}")
            if piece.shape[self.token_dim] != chunk.end - chunk.start:
                raise InvalidValueError(
                    f"KV chunk for tokens {chunk.start}..{chunk.end} holds "
                    f"{piece.shape[self.token_dim]} tokens"
                )
        return pieces[: len(chunks)]
