"""ThreadBatcher: calls queued during a hop ride it, in order, each with its own outcome."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest

from lmtier import StoreConfig, TierConfig, TieredStore
from lmtier.tiers import DiskTier
from lmtier.tiers.batching import ThreadBatcher

from conftest import tensor_for


async def test_calls_queued_during_a_hop_ride_it_in_order() -> None:
    batcher = ThreadBatcher()
    entered, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def first() -> str:
        entered.set()
        release.wait(5)
        return "first"

    def job(i: int) -> int:
        assert threading.current_thread() is not threading.main_thread()
        ran.append(i)
        return i * i

    head = asyncio.create_task(batcher.call(first))
    await asyncio.to_thread(entered.wait, 5)
    rest = [asyncio.create_task(batcher.call(job, i)) for i in range(10)]
    await asyncio.sleep(0.01)
    release.set()
    assert await head == "first"
    assert await asyncio.gather(*rest) == [i * i for i in range(10)]
    assert ran == list(range(10))
    assert batcher.hops == 1


async def test_an_exception_reaches_its_own_caller_only() -> None:
    batcher = ThreadBatcher()

    def fail() -> None:
        raise OSError(28, "No space left on device")

    results = await asyncio.gather(
        batcher.call(lambda: 1), batcher.call(fail), batcher.call(lambda: 3),
        return_exceptions=True,
    )  # fmt: skip
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], OSError) and results[1].errno == 28


async def test_no_call_is_stranded_when_calls_arrive_as_a_hop_ends() -> None:
    batcher = ThreadBatcher()
    rng = random.Random(7)

    async def caller(i: int) -> int:
        await asyncio.sleep(rng.random() * 0.002)
        return await batcher.call(time.sleep, rng.random() * 0.0002) or i

    got = await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(400))), 20)
    assert got == list(range(400))
    assert 1 <= batcher.hops < 400


async def test_a_burst_of_small_disk_writes_shares_hops(tmp_path: Path) -> None:
    tiers = (TierConfig("disk", "disk", 1 << 20, path=str(tmp_path)),)
    async with TieredStore(StoreConfig(tiers)) as store:
        items = [(f"k{i}", tensor_for(f"k{i}")) for i in range(32)]
        await store.put_many(items)
        disk = store.tiers[0]
        assert isinstance(disk, DiskTier)
        assert 1 <= disk._small_writes.hops < 8
        for key, value in items:
            got = await store.get(key)
            assert got is not None and bool((got == value).all())
        assert store.audit() == []


@pytest.mark.parametrize("fail_at", [0, 5])
async def test_a_failed_write_in_a_batch_leaves_the_others_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    tiers = (TierConfig("disk", "disk", 1 << 20, path=str(tmp_path)),)
    async with TieredStore(StoreConfig(tiers)) as store:
        disk = store.tiers[0]
        assert isinstance(disk, DiskTier)
        real = disk._write_file

        def write_file(key: object, tensor: object) -> object:
            if key == f"k{fail_at}":
                raise OSError(28, "No space left on device")
            return real(key, tensor)  # type: ignore[arg-type]

        monkeypatch.setattr(disk, "_write_file", write_file)
        items = [(f"k{i}", tensor_for(f"k{i}")) for i in range(10)]
        await store.put_many(items)
        assert [await store.contains(k) for k, _ in items] == [
            None if i == fail_at else "disk" for i in range(10)
        ]
        assert disk.counters.errors == 1 and store.audit() == []
