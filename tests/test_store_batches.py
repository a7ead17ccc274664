"""put_many and get_many as one call: few tasks, and exact under overlapping writes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lmtier import PutStatus
from lmtier.config import StoreConfig, TierConfig
from lmtier.store import TieredStore

from conftest import tensor_for
from store_helpers import KIB


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
