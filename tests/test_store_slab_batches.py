"""The store's batched GPU path run on CPU tensors: stores here stage CPU batches as they stage
GPU ones (``_stage_from``/``_batch_to``), so the slab runs, gathers, single copies, adoption,
release and accounting are checked bit-exact without a GPU."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lmtier import PutStatus
from lmtier.config import StoreConfig, TierConfig
from lmtier.store import TieredStore
from lmtier.tiers import MemoryTier, Tier, batch_copies
from lmtier.tiers.batch_copies import find_runs
from lmtier.tiers.host_slab import ALIGN, aligned

from conftest import tensor_for
from store_helpers import KIB

ALL = frozenset({"cuda", "cpu"})


def batching(config: StoreConfig) -> TieredStore:
    store = TieredStore(config)
    store._mover.stage_from = ALL
    store._reader.batch_to = ALL
    return store


def cpu_disk(root: Path, cpu: int = 64 * KIB) -> StoreConfig:
    return StoreConfig(
        tiers=(
            TierConfig("cpu", "memory", cpu),
            TierConfig("disk", "disk", 256 * KIB, path=str(root)),
        )
    )


def two_memory_tiers(top: int = 4 * KIB, low: int = 64 * KIB) -> StoreConfig:
    return StoreConfig(
        tiers=(TierConfig("top", "memory", top), TierConfig("low", "memory", low)),
    )


@contextmanager
def counted_steps() -> Iterator[Counter[str]]:
    """The batch steps (copy, cat, scatter) run inside the block."""
    before = Counter(batch_copies.step_counts)
    counts: Counter[str] = Counter()
    yield counts
    counts.update(batch_copies.step_counts)
    counts.subtract(before)


def assert_slab_exact(tier: Tier) -> None:
    """Every range in use is an entry's; the rest of the pieces is free."""
    assert isinstance(tier, MemoryTier) and tier.slab is not None
    gc.collect()
    slab = tier.slab
    slab.reclaim()
    owned = [obj for obj in tier.cache_dict.values() if slab.owns(obj)]
    assert slab.ranges_in_use == len(owned)
    assert slab.free_bytes + sum(aligned(obj.nbytes) for obj in owned) == slab.allocated_bytes
    assert not tier._staged


async def test_put_many_stages_a_batch_with_one_gather_and_one_copy(tmp_path: Path) -> None:
    items = [(f"k{i}", tensor_for(f"k{i}")) for i in range(8)]
    async with batching(cpu_disk(tmp_path)) as store:
        with counted_steps() as steps:
            statuses = await store.put_many(items)
        assert statuses == [PutStatus.LEGAL] * 8
        assert steps["cat"] == 1 and steps["copy"] == 1
        cpu = store.tiers[0]
        entries = [cpu.lookup(key) for key, _ in items]
        assert len(find_runs(entries)) == 1  # the staged views were adopted as they are
        del entries
        for _, tensor in items:
            tensor.fill_(-1)  # the caller's tensors: the store holds its own copies
        for key, _ in items:
            got = await store.get(key)
            assert got is not None and torch.equal(got, tensor_for(key))
        assert store.audit() == []
        assert_slab_exact(cpu)


async def test_a_staged_chunk_that_lands_below_has_its_range_freed(tmp_path: Path) -> None:
    items = [(f"big{i}", tensor_for(f"big{i}", numel=2 * KIB)) for i in range(3)]  # 8 KiB each
    async with batching(cpu_disk(tmp_path, cpu=4 * KIB)) as store:
        assert await store.put_many(items) == [PutStatus.LEGAL] * 3
        assert [await store.contains(key) for key, _ in items] == ["disk"] * 3
        for key, _ in items:
            got = await store.get(key)
            assert got is not None and torch.equal(got, tensor_for(key, numel=2 * KIB))
        assert store.audit() == []
        assert_slab_exact(store.tiers[0])


async def test_get_many_of_a_run_of_host_hits_is_one_copy_into_one_buffer() -> None:
    items = [(f"m{i}", torch.full((256 * KIB,), i, dtype=torch.int32)) for i in range(6)]
    config = StoreConfig(tiers=(TierConfig("cpu", "memory", 16 << 20),))
    async with batching(config) as store:
        await store.put_many(items)
        with counted_steps() as steps:
            got = await store.get_many([key for key, _ in items], device="cpu")
        assert steps["copy"] == 1 and steps["cat"] == 0 and steps["scatter"] == 0
        assert len({value.untyped_storage().data_ptr() for value in got if value is not None}) == 1
        for value, (_, expected) in zip(got, items, strict=True):
            assert value is not None and torch.equal(value, expected)
            value.fill_(-1)  # the caller's copy: the stored entry is untouched
        again = await store.get("m3")
        assert again is not None and torch.equal(again, items[3][1])
        assert store.stats()["tiers"]["cpu"]["pinned_entries"] == 0


async def test_get_many_hits_due_for_promotion_move_as_one_batch_then_promote() -> None:
    async with batching(two_memory_tiers(top=8 * KIB)) as store:
        for i in range(12):
            await store.put(f"k{i}", tensor_for(f"k{i}"))  # 1 KiB each: k0..k3 spill to low
        low_keys = [f"k{i}" for i in range(4)]
        assert [await store.contains(key) for key in low_keys] == ["low"] * 4
        with counted_steps() as steps:
            got = await store.get_many(low_keys, device="cpu")
        assert steps["copy"] == 1, "the four host hits, one run of the low tier, in one copy"
        for value, key in zip(got, low_keys, strict=True):
            assert value is not None and torch.equal(value, tensor_for(key))
        assert [await store.contains(key) for key in low_keys] == ["top"] * 4
        top, low = store.tiers
        assert low.counters.promotions_out == 4 and top.counters.promotions_in == 4
        assert store.audit() == []
        assert_slab_exact(top)
        assert_slab_exact(low)


async def test_a_batch_promotion_that_an_overwrite_made_stale_never_lands() -> None:
    async with batching(two_memory_tiers(top=8 * KIB)) as store:
        for i in range(12):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        reading = asyncio.create_task(store.get_many(["k0", "k1"], device="cpu"))
        await asyncio.sleep(0)  # the batch is copied; its promotions wait their turn
        await store.put("k0", tensor_for("k0", version=1))
        got = await reading
        assert got[0] is not None and torch.equal(got[0], tensor_for("k0"))  # read before
        now = await store.get("k0")
        assert now is not None and torch.equal(now, tensor_for("k0", version=1))
        assert await store.contains("k1") == "top" and store.audit() == []
        assert store.tiers[0].counters.promotions_in == 1, "k0's promotion went stale"


async def test_the_victims_of_one_eviction_are_staged_as_one_batch() -> None:
    async with batching(two_memory_tiers()) as store:
        for i in range(4):
            await store.put(f"k{i}", tensor_for(f"k{i}"))  # 1 KiB each: the top tier is full
        with counted_steps() as steps:
            await store.put("wide", tensor_for("wide", numel=768))  # three victims
        # One copy; no gather, as the victims already lie in one run of the top tier's slab
        # (a GPU tier's entries are buffers of their own: there a gather comes first).
        assert steps["copy"] == 1 and steps["cat"] == 0
        top, low = store.tiers
        assert [await store.contains(f"k{i}") for i in range(4)] == ["low"] * 3 + ["top"]
        assert isinstance(low, MemoryTier) and low.slab is not None
        assert all(low.slab.owns(low.lookup(f"k{i}")) for i in range(3))
        for i in range(4):
            got = await store.get(f"k{i}", device="cpu")
            assert got is not None and torch.equal(got, tensor_for(f"k{i}"))
        assert store.audit() == []
        assert_slab_exact(top)
        assert_slab_exact(low)


async def test_batches_racing_overwrites_and_deletes_of_shared_keys_stay_exact(
    tmp_path: Path,
) -> None:
    config = StoreConfig(
        tiers=(
            TierConfig("top", "memory", 6 * KIB),
            TierConfig("mid", "memory", 12 * KIB),
            TierConfig("disk", "disk", 256 * KIB, path=str(tmp_path)),
        )
    )
    keys = [f"k{i}" for i in range(20)]
    async with batching(config) as store:
        for round_ in range(1, 7):
            overlapping = keys[round_ % 3 :: 2]
            got, *_ = await asyncio.gather(
                store.get_many(keys, device="cpu"),
                store.put_many([(k, tensor_for(k, round_)) for k in overlapping]),
                store.put_many([(k, tensor_for(k, round_ + 100)) for k in keys[::3]]),
                *(store.delete(k) for k in keys[round_ % 5 :: 7]),
            )
            for key, value in zip(keys, got, strict=True):
                allowed = [tensor_for(key, v) for v in [*range(round_ + 1), *range(100, 107)]]
                assert value is None or any(torch.equal(value, a) for a in allowed), key
            assert store.audit() == []
        await asyncio.sleep(0.05)
        for key in keys:  # each key reads as one of its versions, or was deleted
            value = await store.get(key)
            allowed = [tensor_for(key, v) for v in [*range(7), *range(100, 107)]]
            assert value is None or any(torch.equal(value, a) for a in allowed), key
        assert store.audit() == []
        for tier in store.tiers[:2]:
            assert_slab_exact(tier)


async def test_a_cancelled_put_many_still_lands_and_leaks_no_range(tmp_path: Path) -> None:
    items = [(f"k{i}", tensor_for(f"k{i}", numel=64 * (1 + i % 4))) for i in range(24)]
    async with batching(cpu_disk(tmp_path, cpu=8 * KIB)) as store:
        task = asyncio.ensure_future(store.put_many(items))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        while store.background.tasks:  # the puts finish in the background
            await asyncio.gather(*list(store.background.tasks), return_exceptions=True)
        for key, tensor in items:
            got = await store.get(key)
            assert got is not None and torch.equal(got, tensor), key
        assert store.audit() == []
        assert all(store.stats()["tiers"][t]["pinned_entries"] == 0 for t in ("cpu", "disk"))
        assert_slab_exact(store.tiers[0])


async def test_entries_of_any_dtype_keep_their_alignment_in_a_run(tmp_path: Path) -> None:
    items = [
        ("a", torch.arange(5, dtype=torch.int8)),  # padding after it
        ("b", torch.arange(6, dtype=torch.float64)),
        ("c", torch.arange(3, dtype=torch.int16).reshape(3, 1)),
    ]
    async with batching(cpu_disk(tmp_path)) as store:
        await store.put_many(items)
        cpu = store.tiers[0]
        assert all(cpu.lookup(key).data_ptr() % ALIGN == 0 for key, _ in items)
        got = await store.get_many([key for key, _ in items], device="cpu")
        for value, (_, expected) in zip(got, items, strict=True):
            assert value is not None and value.dtype == expected.dtype
            assert torch.equal(value, expected)
