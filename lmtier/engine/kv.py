"""What an engine calls: look up a prompt's cached prefix, retrieve it, store new chunks."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

import torch

from lmtier.engine.chunks import ChunkKey, ChunkSpec, token_chunks
from lmtier.errors import InvalidValueError, LmtierTypeError
from lmtier.evictor import PutStatus
from lmtier.keys import CacheEngineKey, KeyLike
from lmtier.store import TieredStore

__all__ = ["DEFAULT_PIN_LEASE_S", "KVCacheEngine", "Tokens"]

log = logging.getLogger(__name__)

#: How long a lookup's pins hold without a retrieve or release (an engine retrieves within
#: its scheduling step; a pin older than this belongs to a request that was dropped).
DEFAULT_PIN_LEASE_S = 30.0

Tokens = Sequence[int] | torch.Tensor


class KVCacheEngine:
    """Chunked prefix caching on a TieredStore.

    KV tensors carry the tokens along ``token_dim`` (2 in the default layout
    ``[num_layers, 2 (K and V), num_tokens, num_kv_heads, head_dim]``); each full chunk of
    ``spec.chunk_size`` tokens is one store entry.  ``lookup`` pins the chunks it counts so that
    they survive until ``retrieve`` or ``release``, or until ``pin_lease_s`` seconds have passed
    (None: no limit), so that a request the engine aborted never holds room for good.
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
        # Each pin's lease timer (None without a lease), oldest first: a release ends the
        # oldest, an expiry its own.
        self._pins: dict[CacheEngineKey, deque[asyncio.TimerHandle | None]] = {}
        self.pins_expired = 0

    def chunks(self, tokens: Tokens) -> list[ChunkKey]:
        return token_chunks(self.spec, tokens)

    async def lookup(self, tokens: Tokens) -> int:
        """How many leading tokens are cached (in any tier); those chunks are now pinned.

        Counted in the store's ``metrics.engine``: the tokens asked about, and those found by
        the tier holding their chunk.
        """
        hit = 0
        counters = self._store.metrics.engine
        for chunk in self.chunks(tokens):
            tier = self._store.pin(chunk.key)
            if tier is None:
                break
            self._add_pin(chunk.key)
            counters.hit_tokens[tier] += chunk.end - chunk.start
            hit = chunk.end
        counters.lookups += 1
        counters.tokens += len(tokens)
        return hit

    def _add_pin(self, key: CacheEngineKey) -> None:
        leases = self._pins.setdefault(key, deque())
        if self.pin_lease_s is None:
            leases.append(None)
            return
        lease: list[asyncio.TimerHandle] = []
        loop = asyncio.get_running_loop()
        lease.append(loop.call_later(self.pin_lease_s, self._expire, key, lease))
        leases.append(lease[0])

    def _expire(self, key: CacheEngineKey, lease: list[asyncio.TimerHandle]) -> None:
        leases = self._pins.get(key)
        if leases is None or lease[0] not in leases:
            return
        leases.remove(lease[0])
        if not leases:
            del self._pins[key]
        self._store.unpin(key)
        self.pins_expired += 1
        if self.pins_expired == 1 or self.pins_expired % 1000 == 0:
            log.warning(
                "a lookup's pin of %r expired after %.1f s without retrieve or release "
                "(%d so far): was the request aborted?",
                key,
                self.pin_lease_s,
                self.pins_expired,
            )

    def release(self, tokens: Tokens) -> None:
        """Drop the pins a ``lookup`` of ``tokens`` took, without retrieving."""
        for chunk in self.chunks(tokens):
            self._unpin(chunk.key)

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
        self, tokens: Tokens, device: str | torch.device | None = None
    ) -> tuple[int, torch.Tensor | None]:
        """The cached prefix of ``tokens``: its length and its KV on ``device``.

        Releases the pins of a preceding ``lookup`` of these tokens.
        """
        chunks = self.chunks(tokens)
        prefix_keys = []
        for chunk in chunks:  # only the cached prefix: chunks after a gap are of no use
            if await self._store.contains(chunk.key) is None:
                break
            prefix_keys.append(chunk.key)
        try:
            got = await self._store.get_many(prefix_keys, device)
        finally:
            for chunk in chunks:
                self._unpin(chunk.key)
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

    def _unpin(self, key: CacheEngineKey) -> None:
        leases = self._pins.get(key)
        if not leases:
            return
        timer = leases.popleft()
        if timer is not None:
            timer.cancel()
        if not leases:
            del self._pins[key]
        self._store.unpin(key)
