"""put_many and get_many as one call: few tasks, and exact under overlapping writes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import PutStatus
from lmtier.config import StoreConfig, TierConfig
from lmtier.store import TieredStore
from lmtier.tiers import copies

from conftest import tensor_for
from store_helpers import KIB, count_waits


@contextmanager
def counted_tasks() -> Iterator[list[int]]:
    """Count the tasks the running loop creates inside the block."""
    loop = asyncio.get_running_loop()
    made = [0]
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made[0] += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        yield made
    finally:
        loop.set_task_factory(previous)


def two_memory_tiers(promote: bool = True) -> TieredStore:
    return TieredStore(
        StoreConfig(
            tiers=(TierConfig("top", "memory", 8 * KIB), TierConfig("low", "memory", 64 * KIB)),
            promote_on_hit=promote,
        )
    )


async def test_a_batch_of_hits_creates_no_task_and_a_batch_of_puts_one_per_chunk() -> None:
    async with two_memory_tiers() as store:
        items = [(f"k{i}", tensor_for(f"k{i}")) for i in range(8)]
        with counted_tasks() as made:
            assert await store.put_many(items) == [PutStatus.LEGAL] * 8
        assert made[0] <= len(items) + 1  # one background task, one per placement
        with counted_tasks() as made:
            got = await store.get_many([key for key, _ in items] + ["missing"])
        assert made[0] == 0
        assert got[-1] is None
        assert all(torch.equal(g, t) for g, (_, t) in zip(got, items, strict=False))  # type: ignore[arg-type]


async def test_get_many_counts_hits_and_misses_as_single_gets_do(tmp_path: Path) -> None:
    async def counters(batched: bool) -> dict[str, dict[str, int]]:
        config = StoreConfig(
            tiers=(
                TierConfig("cpu", "memory", 4 * KIB),
                TierConfig("disk", "disk", 16 * KIB, path=str(tmp_path / str(batched))),
            )
        )
        async with TieredStore(config) as store:
            for i in range(8):
                await store.put(f"k{i}", tensor_for(f"k{i}"))
            keys = ["k1", "k6", "nope", "k7", "k2"]
            if batched:
                got = await store.get_many(keys)
            else:
                got = [await store.get(key) for key in keys]
            assert [g is None for g in got] == [False, False, True, False, False]
            assert torch.equal(got[0], tensor_for("k1"))  # type: ignore[arg-type]
            stats = store.stats()["tiers"]
            return {t: {c: stats[t][c] for c in ("hits", "misses")} for t in stats}

    assert await counters(True) == await counters(False)


async def test_get_many_racing_overwrites_and_deletes_reads_old_new_or_nothing() -> None:
    async with two_memory_tiers() as store:
        keys = [f"k{i}" for i in range(24)]  # 8 fit the top tier: the rest are lower hits
        for key in keys:
            await store.put(key, tensor_for(key))
        for round_ in range(1, 6):
            new = [(key, tensor_for(key, version=round_)) for key in keys[::2]]
            got, *_ = await asyncio.gather(
                store.get_many(keys),
                store.put_many(new),
                *(store.delete(key) for key in keys[1::6]),
            )
            for key, value in zip(keys, got, strict=True):
                allowed = [tensor_for(key, version=v) for v in range(round_ + 1)]
                assert value is None or any(torch.equal(value, a) for a in allowed), key
            assert store.audit() == []
            for key in keys[1::6]:
                await store.put(key, tensor_for(key, version=round_))


async def test_a_cancelled_get_many_leaves_no_pin(tmp_path: Path) -> None:
    config = StoreConfig(
        tiers=(
            TierConfig("cpu", "memory", 4 * KIB),
            TierConfig("disk", "disk", 64 * KIB, path=str(tmp_path)),
        )
    )
    async with TieredStore(config) as store:
        keys = [f"k{i}" for i in range(32)]
        await store.put_many([(key, tensor_for(key)) for key in keys])
        task = asyncio.ensure_future(store.get_many(keys))
        await asyncio.sleep(0)  # its disk reads are under way
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.2)
        assert all(store.stats()["tiers"][t]["pinned_entries"] == 0 for t in ("cpu", "disk"))
        assert store.audit() == []


def large_entries(count: int) -> list[tuple[str, torch.Tensor]]:
    """Entries of 1 MiB: above the size a hit is cloned on the spot."""
    return [(f"big{i}", torch.full((256 * KIB,), i, dtype=torch.int32)) for i in range(count)]


async def test_large_memory_hits_are_copied_in_one_thread_hop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hops: list[int] = []
    real_to_thread = asyncio.to_thread

    async def counting(fn: Any, *args: Any) -> Any:
        hops.append(len(args[0]) if args and isinstance(args[0], list) else 1)
        return await real_to_thread(fn, *args)

    monkeypatch.setattr(copies.asyncio, "to_thread", counting)
    items = large_entries(8)
    async with TieredStore(StoreConfig(tiers=(TierConfig("cpu", "memory", 16 << 20),))) as store:
        await store.put_many(items)
        hops.clear()
        got = await store.get_many([key for key, _ in items])
        assert hops == [8]  # eight copies, one hop
        for value, (key, expected) in zip(got, items, strict=True):
            assert value is not None and torch.equal(value, expected), key
            value.fill_(-1)  # the caller's own copy: the stored entry is untouched
        again = await store.get("big0")
        assert again is not None and torch.equal(again, items[0][1])
        assert store.stats()["tiers"]["cpu"]["pinned_entries"] == 0
        assert store.stats()["tiers"]["cpu"]["hits"] == 9


async def test_a_batch_copy_racing_overwrites_reads_old_or_new() -> None:
    items = large_entries(6)
    async with TieredStore(StoreConfig(tiers=(TierConfig("cpu", "memory", 8 << 20),))) as store:
        await store.put_many(items)
        for version in range(1, 4):
            new = [(key, value + 100 * version) for key, value in items]
            got, _ = await asyncio.gather(
                store.get_many([k for k, _ in items]), store.put_many(new)
            )
            for value, (key, first) in zip(got, items, strict=True):
                allowed = [first + 100 * v for v in range(version + 1)]
                assert value is not None and any(torch.equal(value, a) for a in allowed), key
            assert store.audit() == []


async def test_copy_pairs_copies_small_host_pairs_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_thread(*args: Any) -> Any:
        raise AssertionError("a small host batch took a thread hop")

    monkeypatch.setattr(copies.asyncio, "to_thread", no_thread)
    sources = [torch.arange(64, dtype=dtype) for dtype in (torch.int8, torch.float16, torch.int64)]
    targets = [torch.empty_like(src) for src in sources]
    await copies.copy_pairs(list(zip(targets, sources, strict=True)))
    assert all(torch.equal(t, s) for t, s in zip(targets, sources, strict=True))


@pytest.mark.cuda
async def test_a_batch_to_the_gpu_is_one_side_stream_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    waits = count_waits(monkeypatch)
    items = large_entries(8)
    config = StoreConfig(tiers=(TierConfig("cpu", "memory", 16 << 20, pinned=True),))
    async with TieredStore(config) as store:
        await store.put_many(items)
        got = await store.get_many([key for key, _ in items], device="cuda")
        assert len(waits) == 1  # eight host-to-device copies, one event
        for value, (_, expected) in zip(got, items, strict=True):
            assert value is not None and value.is_cuda and torch.equal(value.cpu(), expected)
