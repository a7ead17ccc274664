"""The engine API: chunk keys, lookup/pin/release, store/retrieve, and the paged adapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmtier import StoreConfig, TierConfig, TieredStore
from lmtier.engine import ChunkSpec, KVCacheEngine, PagedKVAdapter, token_chunks
from lmtier.errors import ConfigError, InvalidValueError, LmtierTypeError

KIB = 1024
SPEC = ChunkSpec("llama-tiny", chunk_size=4, namespace="w0|float32|vllm")


def kv_for(tokens: int, seed: int = 0, layers: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, tokens, 2, 8, generator=generator)


def memory_store(budget: int = 64 * KIB, tmp_path: Path | None = None) -> TieredStore:
    tiers = [TierConfig("gpu", "memory", budget)]
    if tmp_path is not None:
        tiers.append(TierConfig("disk", "disk", 4 * budget, path=str(tmp_path)))
    return TieredStore(StoreConfig(tuple(tiers)))


# ---------------------------------------------------------------------- chunk keys
def test_chunk_keys_chain_the_prefix() -> None:
    a = token_chunks(SPEC, list(range(10)))
    b = token_chunks(SPEC, [*range(8), 99, 98, 97, 96])
    assert [(c.start, c.end) for c in a] == [(0, 4), (4, 8)]  # the partial chunk is not kept
    assert [c.key for c in a] == [c.key for c in b[:2]] and b[2].key not in {c.key for c in a}
    changed_first = token_chunks(SPEC, [7, *range(1, 8)])
    assert changed_first[1].key != a[1].key, "a later chunk's key must cover its whole prefix"
    partial = token_chunks(ChunkSpec("m", chunk_size=4, save_partial=True), list(range(10)))
    assert [(c.start, c.end) for c in partial] == [(0, 4), (4, 8), (8, 10)]
    assert a[0].key.model_name == "llama-tiny" and a[0].key.fmt == "vllm"
    assert token_chunks(SPEC, torch.arange(10)) == a


def test_namespaces_separate_every_chunk() -> None:
    other = ChunkSpec("llama-tiny", chunk_size=4, namespace="w1|float32|vllm")
    ours = {c.key for c in token_chunks(SPEC, list(range(16)))}
    assert not ours & {c.key for c in token_chunks(other, list(range(16)))}


GOLDEN = (
    "from lmtier.engine import ChunkSpec, token_chunks; "
    "spec = ChunkSpec('m', chunk_size=3, namespace='ns'); "
    "print(token_chunks(spec, [5, 6, 7, 8, 9, 10])[-1].key.chunk_hash)"
)
# Pinned: a change of the hash scheme would orphan every cache written before it.
GOLDEN_HASH = "0f667b0ac472004a90cce6bd715a502f"


def test_chunk_hashes_are_the_same_in_every_process() -> None:
    here = token_chunks(ChunkSpec("m", chunk_size=3, namespace="ns"), [5, 6, 7, 8, 9, 10])
    expected = here[-1].key.chunk_hash
    for seed in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", GOLDEN], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert out.stdout.strip() == expected
    assert expected == GOLDEN_HASH


def test_bad_tokens_and_specs_are_clear_errors() -> None:
    with pytest.raises(LmtierTypeError):
        token_chunks(SPEC, [1.5, 2.0])  # type: ignore[list-item]
    with pytest.raises(LmtierTypeError):
        token_chunks(SPEC, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ConfigError):
        ChunkSpec("m", chunk_size=0)
    with pytest.raises(ValueError):
        ChunkSpec("m@x")


# ---------------------------------------------------------------------- lookup, store, retrieve
async def test_store_then_lookup_and_retrieve_the_prefix() -> None:
    async with memory_store() as store:
        engine = KVCacheEngine(store, SPEC)
        tokens = list(range(10))
        kv = kv_for(10)
        assert await engine.store(tokens, kv) == 8
        query = [*range(8), 50, 51, 52, 53]
        assert await engine.lookup(query) == 8
        hit, got = await engine.retrieve(query)
        assert hit == 8 and got is not None and torch.equal(got, kv[:, :, :8])
        assert await engine.lookup([9, 9, 9, 9]) == 0
        assert await engine.store(tokens, kv) == 8  # nothing new to put
        with pytest.raises(InvalidValueError, match="does not hold"):
            await engine.store(tokens, kv_for(7))


async def test_a_pinned_chunk_survives_a_flood_and_a_released_one_does_not() -> None:
    async with memory_store(budget=8 * KIB) as store:  # room for 4 chunks of 2 KiB
        engine = KVCacheEngine(store, SPEC)
        kept, dropped = list(range(4)), list(range(100, 104))
        await engine.store(kept, kv_for(4, 1))
        await engine.store(dropped, kv_for(4, 2))
        assert await engine.lookup(kept) == 4 and await engine.lookup(dropped) == 4
        engine.release(dropped)
        for i in range(20):
            await engine.store(list(range(1000 + 4 * i, 1004 + 4 * i)), kv_for(4, 3))
        assert await store.contains(token_chunks(SPEC, kept)[0].key) == "gpu"
        assert await store.contains(token_chunks(SPEC, dropped)[0].key) is None
        hit, got = await engine.retrieve(kept)
        assert hit == 4 and got is not None and torch.equal(got, kv_for(4, 1))
        for i in range(20):  # retrieved: unpinned, so evictable now
            await engine.store(list(range(5000 + 4 * i, 5004 + 4 * i)), kv_for(4, 3))
        assert await store.contains(token_chunks(SPEC, kept)[0].key) is None
        assert store.audit() == []


async def flood(engine: KVCacheEngine, base: int, chunks: int = 20) -> None:
    """Store ``chunks`` new chunks: every unpinned chunk of a small tier is evicted."""
    for i in range(chunks):
        await engine.store(list(range(base + 4 * i, base + 4 + 4 * i)), kv_for(4, 3))


async def test_a_release_drops_only_the_pins_its_own_lookup_took() -> None:
    async with memory_store(budget=8 * KIB) as store:  # room for 4 chunks of 2 KiB
        engine = KVCacheEngine(store, SPEC)
        tokens, kv = list(range(8)), kv_for(8, 1)
        await engine.store(tokens[:4], kv[:, :, :4])
        assert await engine.lookup(tokens) == 4  # request A: its first chunk only
        await engine.store(tokens, kv)
        assert await engine.lookup(tokens) == 8  # request B is promised both chunks
        engine.release(tokens)  # request A lets go of what it pinned, and only that
        await flood(engine, 1000)
        hit, got = await engine.retrieve(tokens)  # request B
        assert hit == 8 and got is not None and torch.equal(got, kv)
        await flood(engine, 5000)  # every pin was released: nothing is left
        assert [await store.contains(c.key) for c in engine.chunks(tokens)] == [None, None]
        assert store.audit() == []


async def test_a_chunk_two_lookups_pinned_stays_until_both_let_go() -> None:
    async with memory_store(budget=8 * KIB) as store:
        engine = KVCacheEngine(store, SPEC)
        shared, kv = list(range(4)), kv_for(4, 1)
        await engine.store(shared, kv)
        first = await engine.lookup_pins(shared)
        second = await engine.lookup_pins([*shared, 70, 71, 72, 73])  # a longer request
        assert (first.tokens, second.tokens) == (4, 4) and first.keys == second.keys
        engine.release(first)
        engine.release(first)  # released already: nothing more
        await flood(engine, 1000)
        hit, got = await engine.retrieve(shared, pins=second)
        assert hit == 4 and got is not None and torch.equal(got, kv)
        await flood(engine, 5000)
        assert await store.contains(first.keys[0]) is None
        # A retrieve of the prefix a lookup found releases that lookup (the paged adapter's way).
        await engine.store(shared, kv)
        assert await engine.lookup([*shared, 90, 91, 92, 93]) == 4
        await engine.retrieve(shared)
        await flood(engine, 9000)
        assert await store.contains(first.keys[0]) is None
        assert store.stats()["pinned_entries"] == 0


# ---------------------------------------------------------------------- the paged adapter
def paged_buffers(layers: int = 2, blocks: int = 16, device: str = "cpu") -> list[torch.Tensor]:
    return [torch.zeros(2, blocks, 2, 2, 8, device=device) for _ in range(layers)]


async def paged_round_trip(device: str) -> None:
    async with memory_store() as store:
        engine = KVCacheEngine(store, SPEC)
        source = paged_buffers(device=device)
        for layer, cache in enumerate(source):
            cache.copy_(torch.randn(cache.shape, generator=torch.Generator().manual_seed(layer)))
        adapter = PagedKVAdapter(engine, source)
        tokens = list(range(11))
        blocks_a = [3, 9, 1, 12, 7, 5]  # 11 tokens, block size 2
        assert await adapter.save(tokens, blocks_a) == 8
        target = paged_buffers(device=device)
        reader = PagedKVAdapter(engine, target)
        blocks_b = [0, 2, 4, 6, 8, 10]
        assert await reader.load([*range(8), 77, 78, 79], blocks_b) == 8
        for src, dst in zip(source, target, strict=True):
            assert torch.equal(dst[:, blocks_b[:4]], src[:, blocks_a[:4]])
            assert not dst[:, blocks_b[4:]].any(), "blocks past the hit were written"
        assert await reader.load([42] * 8, blocks_b) == 0


async def test_paged_gather_scatter_round_trip_is_bit_exact() -> None:
    await paged_round_trip("cpu")


@pytest.mark.cuda
async def test_paged_round_trip_on_cuda() -> None:
    await paged_round_trip("cuda")


async def test_paged_adapter_rejects_bad_shapes_and_blocks() -> None:
    async with memory_store() as store:
        engine = KVCacheEngine(store, SPEC)
        with pytest.raises(ConfigError, match="multiple"):
            PagedKVAdapter(engine, [torch.zeros(2, 4, 3, 2, 8)])
        with pytest.raises(ConfigError, match="block_size"):
            PagedKVAdapter(engine, [torch.zeros(4, 2, 8)])
        adapter = PagedKVAdapter(engine, paged_buffers())
        with pytest.raises(InvalidValueError, match="need 4 blocks"):
            await adapter.save(list(range(8)), [0, 1])
        with pytest.raises(InvalidValueError, match="outside"):
            await adapter.save(list(range(8)), [0, 1, 2, 99])
