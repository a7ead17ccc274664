"""A vLLM-style paged KV cache on lmtier: gather a request's blocks into chunks, scatter back."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmtier.engine.kv import KVCacheEngine, Tokens
from lmtier.errors import ConfigError, InvalidValueError

__all__ = ["PagedKVAdapter"]


class PagedKVAdapter:
    """Moves whole chunks between lmtier and per-layer paged buffers.

    Each layer's buffer is ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K and V);
    a request owns a list of block ids, in token order.  A chunk of ``chunk_size`` tokens spans
    ``chunk_size // block_size`` blocks and is stored as ``[num_layers, 2, chunk_size,
    num_kv_heads, head_dim]``, the engine's default layout.
    """

    def __init__(self, engine: KVCacheEngine, kv_caches: Sequence[torch.Tensor]) -> None:
        if not kv_caches:
            raise ConfigError("a paged adapter needs at least one layer's KV buffer")
        shape = kv_caches[0].shape
        if len(shape) != 5 or shape[0] != 2:
            raise ConfigError(
                f"a layer's KV buffer must be [2, num_blocks, block_size, heads, head_dim], "
                f"got {list(shape)}"
            )
        if any(cache.shape != shape for cache in kv_caches):
            raise ConfigError("every layer's KV buffer must have the same shape")
        self.block_size = int(shape[2])
        if engine.spec.chunk_size % self.block_size:
            raise ConfigError(
                f"chunk_size {engine.spec.chunk_size} is not a multiple of the block size "
                f"{self.block_size}"
            )
        if engine.token_dim != 2:
            raise ConfigError("the paged adapter stores chunks with tokens on dim 2")
        self.engine = engine
        self.kv_caches = list(kv_caches)
        self.blocks_per_chunk = engine.spec.chunk_size // self.block_size

    async def save(self, tokens: Tokens, block_ids: Sequence[int]) -> int:
        """Store the request's full chunks (one put per request); tokens held in lmtier."""
        chunks = self.engine.chunks(tokens)
        self._check_blocks(chunks[-1].end if chunks else 0, block_ids)
        pieces = [self._gather(block_ids, chunk.start, chunk.end) for chunk in chunks]
        return await self.engine.store(tokens, pieces)

    async def load(self, tokens: Tokens, block_ids: Sequence[int]) -> int:
        """Fill the request's leading blocks from lmtier; how many tokens were loaded."""
        found = await self.engine.lookup_pins(tokens)
        hit = found.tokens
        if not hit:
            return 0
        try:
            self._check_blocks(hit, block_ids)
        except InvalidValueError:
            self.engine.release(found)
            raise
        device = self.kv_caches[0].device
        loaded, kv = await self.engine.retrieve(_prefix(tokens, hit), device, pins=found)
        if kv is None:
            return 0
        for start in range(0, loaded, self.engine.spec.chunk_size):
            end = min(start + self.engine.spec.chunk_size, loaded)
            self._scatter(block_ids, start, end, kv.narrow(2, start, end - start))
        return loaded

    def _gather(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        index = self._index(block_ids, start, end)
        layers = [cache.index_select(1, index).flatten(1, 2) for cache in self.kv_caches]
        return torch.stack(layers)[:, :, : end - start]

    def _scatter(self, block_ids: Sequence[int], start: int, end: int, kv: torch.Tensor) -> None:
        index = self._index(block_ids, start, end)
        count = end - start
        for layer, cache in enumerate(self.kv_caches):
            blocks = cache.index_select(1, index)  # a copy: a partial last block keeps its rest
            blocks.flatten(1, 2)[:, :count] = kv[layer]
            cache.index_copy_(1, index, blocks)

    def _index(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        first = start // self.block_size
        last = -(-end // self.block_size)
        return torch.tensor(
            block_ids[first:last], dtype=torch.long, device=self.kv_caches[0].device
        )

    def _check_blocks(self, tokens: int, block_ids: Sequence[int]) -> None:
        needed = -(-tokens // self.block_size)
        if len(block_ids) < needed:
            raise InvalidValueError(f"{tokens} tokens need {needed} blocks, got {len(block_ids)}")
        num_blocks = self.kv_caches[0].shape[1]
        bad = [b for b in block_ids[:needed] if not 0 <= b < num_blocks]
        if bad:
            raise InvalidValueError(f"block ids {bad[:5]} are outside 0..{num_blocks - 1}")


def _prefix(tokens: Tokens, count: int) -> Tokens:
    return tokens[:count]
