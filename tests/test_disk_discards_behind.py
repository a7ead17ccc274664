"""An entry evicted from a disk tier leaves its index at once and its file in the background
(``Tier.discards_behind``): the put that evicted it does not wait for the unlink, while the
next put or delete of the evicted key does, so no older value is on disk once it returns.
A gate inside the removal holds chosen files mid-unlink."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmtier import PutStatus
from lmtier.config import StoreConfig, TierConfig
from lmtier.store import MAX_DISCARDS_BEHIND, TieredStore
from lmtier.tiers import DiskTier
from lmtier.tiers import disk as disk_module
from lmtier.tiers.disk_files import scan_folder

from conftest import tensor_for
from store_helpers import KIB, ROOM_TIMEOUT_S

# tensor_for(...) is 1 KiB: the disk tier holds 4 entries, the cpu tier above it 2.


def config(root: Path, with_memory: bool) -> StoreConfig:
    memory = (TierConfig("cpu", "memory", 2 * KIB),) if with_memory else ()
    disk = TierConfig("disk", "disk", 4 * KIB, path=str(root / "disk"))
    return StoreConfig((*memory, disk), room_timeout_s=ROOM_TIMEOUT_S)


class RemovalGate:
    """Holds every file removal (in the tier's removal thread) until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.removed: list[Path] = []
        self.fail_with: OSError | None = None


@pytest.fixture
def removals(monkeypatch: pytest.MonkeyPatch) -> Iterator[RemovalGate]:
    gate = RemovalGate()
    original = disk_module._remove_file

    def gated(path: Path, fsync: bool) -> None:
        assert gate.release.wait(60), "the test never released the removals"
        if gate.fail_with is not None:
            raise gate.fail_with
        original(path, fsync)
        gate.removed.append(path)

    monkeypatch.setattr(disk_module, "_remove_file", gated)
    yield gate
    gate.release.set()  # a failing test must not leave the removal thread blocked


def keys_on_disk(store: TieredStore) -> list[str]:
    disk = store.tiers[-1]
    assert isinstance(disk, DiskTier)
    return sorted(str(entry.key) for entry in scan_folder(disk.root, disk.namespace).entries)


async def fill(store: TieredStore, count: int) -> None:
    for i in range(count):
        assert await store.put(f"k{i}", tensor_for(f"k{i}")) is PutStatus.LEGAL


async def test_puts_that_evict_from_disk_do_not_wait_for_the_unlinks(
    tmp_path: Path, removals: RemovalGate
) -> None:
    async with TieredStore(config(tmp_path, with_memory=False)) as store:
        # Twice the tier: every put after the fourth evicts, and every unlink is held.
        await asyncio.wait_for(fill(store, 8), 60)
        assert sorted(store.tiers[0].cache_dict) == ["k4", "k5", "k6", "k7"]
        assert "k0" in keys_on_disk(store), "the evicted files are still being removed"
        removals.release.set()
    assert len(removals.removed) == 4
    async with TieredStore(config(tmp_path, with_memory=False)) as store:
        assert keys_on_disk(store) == ["k4", "k5", "k6", "k7"]
        for i in range(4, 8):
            got = await store.get(f"k{i}")
            assert got is not None and torch.equal(got, tensor_for(f"k{i}"))
        assert store.audit() == []


async def test_removals_in_the_background_are_bounded(
    tmp_path: Path, removals: RemovalGate
) -> None:
    """Past ``MAX_DISCARDS_BEHIND`` held removals, an evicting put waits for its own: the
    folder never holds more than that many files over its budget."""
    async with TieredStore(config(tmp_path, with_memory=False)) as store:
        await asyncio.wait_for(fill(store, 4 + MAX_DISCARDS_BEHIND), 60)
        put = asyncio.create_task(store.put("over", tensor_for("over")))
        await asyncio.sleep(0.1)
        assert not put.done(), "one removal more than the bound: the put waits for it"
        assert len(keys_on_disk(store)) == 4 + MAX_DISCARDS_BEHIND
        removals.release.set()
        assert await asyncio.wait_for(put, 60) is PutStatus.LEGAL
    assert len(removals.removed) == MAX_DISCARDS_BEHIND + 1


@pytest.mark.parametrize("with_memory", [False, True], ids=["disk", "cpu+disk"])
async def test_a_put_of_an_evicted_key_returns_only_once_its_old_file_is_gone(
    tmp_path: Path, removals: RemovalGate, with_memory: bool
) -> None:
    async with TieredStore(config(tmp_path, with_memory)) as store:
        await fill(store, 8 if with_memory else 6)  # k0 and k1 evicted from disk, unlinks held
        assert await store.contains("k0") is None and "k0" in keys_on_disk(store)
        # With a cpu tier the new value stays in memory: only the wait keeps the old file
        # from being the key's value after a crash.
        put = asyncio.create_task(store.put("k0", tensor_for("k0", version=1)))
        await asyncio.sleep(0.1)
        assert not put.done(), "the put waits for the removal of k0's old file"
        removals.release.set()
        assert await asyncio.wait_for(put, 60) is PutStatus.LEGAL
        on_disk = keys_on_disk(store)
        if with_memory:
            assert "k0" not in on_disk
        got = await store.get("k0")
        assert got is not None and torch.equal(got, tensor_for("k0", version=1))
        assert store.audit() == []


async def test_a_put_cancelled_while_it_waits_for_the_old_file_still_lands(
    tmp_path: Path, removals: RemovalGate
) -> None:
    async with TieredStore(config(tmp_path, with_memory=True)) as store:
        await fill(store, 8)
        put = asyncio.create_task(store.put("k0", tensor_for("k0", version=1)))
        await asyncio.sleep(0.1)
        put.cancel()  # mid-wait: the put goes on in the background, as every put does
        with pytest.raises(asyncio.CancelledError):
            await put
        assert await store.contains("k0") == "cpu"
        removals.release.set()
    async with TieredStore(config(tmp_path, with_memory=False)) as store:
        assert await store.get("k0") is None, "the old file is gone, the new value was in memory"
        assert store.audit() == []


async def test_a_delete_of_an_evicted_key_returns_only_once_its_old_file_is_gone(
    tmp_path: Path, removals: RemovalGate
) -> None:
    async with TieredStore(config(tmp_path, with_memory=True)) as store:
        await fill(store, 8)
        assert "k0" in keys_on_disk(store)
        delete = asyncio.create_task(store.delete("k0"))
        await asyncio.sleep(0.1)
        assert not delete.done(), "the delete waits for the removal of k0's old file"
        removals.release.set()
        assert await asyncio.wait_for(delete, 60) is False  # it was evicted before
        assert "k0" not in keys_on_disk(store)


async def test_a_removal_that_fails_is_counted_and_holds_nothing_up(
    tmp_path: Path, removals: RemovalGate
) -> None:
    removals.fail_with = OSError(errno.EIO, "injected EIO")
    removals.release.set()
    async with TieredStore(config(tmp_path, with_memory=False)) as store:
        await asyncio.wait_for(fill(store, 6), 60)
        assert await asyncio.wait_for(store.put("k0", tensor_for("k0", version=1)), 60) is (
            PutStatus.LEGAL
        )
        await asyncio.wait_for(store.delete("k1"), 60)
        assert store.stats()["tiers"]["disk"]["errors"] >= 2
        got = await store.get("k0")
        assert got is not None and torch.equal(got, tensor_for("k0", version=1))
        assert store.audit() == []
    # A restart keeps the newest file of each key: the new k0, never the left-over old one.
    removals.fail_with = None
    async with TieredStore(config(tmp_path, with_memory=False)) as store:
        got = await store.get("k0")
        assert got is not None and torch.equal(got, tensor_for("k0", version=1))


async def test_overlapping_puts_and_deletes_of_evicted_keys_leave_one_value_each(
    tmp_path: Path, removals: RemovalGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks share six keys over a disk tier of four entries while every unlink is slow;
    then each key is put once more: the folder holds one file per key, and a restart serves
    each key's last value or nothing."""
    removals.release.set()
    gated = disk_module._remove_file
    slowed: list[Path] = []

    def slow(path: Path, fsync: bool) -> None:
        slowed.append(path)
        threading.Event().wait(0.002)
        gated(path, fsync)

    monkeypatch.setattr(disk_module, "_remove_file", slow)
    keys = [f"s{i}" for i in range(6)]
    put: dict[str, set[int]] = {key: set() for key in keys}

    async def worker(store: TieredStore, task: int) -> None:
        for step in range(40):
            key = keys[(task + step) % len(keys)]
            if step % 7 == 3:
                await store.delete(key)
            else:
                put[key].add(task * 1000 + step)
                await store.put(key, tensor_for(key, task * 1000 + step))
            got = await store.get(key)
            assert got is None or any(torch.equal(got, tensor_for(key, v)) for v in put[key])

    async with TieredStore(config(tmp_path, with_memory=True)) as store:
        await asyncio.wait_for(asyncio.gather(*(worker(store, t) for t in range(4))), 60)
        for key in keys:
            await store.put(key, tensor_for(key, 99_999))
        assert store.audit() == []
    assert slowed, "the workload evicted from disk"
    disk = config(tmp_path, with_memory=True).tiers[-1]
    async with TieredStore(StoreConfig((disk,))) as store:
        on_disk = keys_on_disk(store)
        assert len(on_disk) == len(set(on_disk)), f"two files of one key: {on_disk}"
        for key in on_disk:
            got = await store.get(key)
            assert got is not None and torch.equal(got, tensor_for(key, 99_999)), key
