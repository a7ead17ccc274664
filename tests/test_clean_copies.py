"""Clean copies: a promoted entry leaves its bytes below, so demoting it again writes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier.config import StoreConfig, TierConfig
from lmtier.keys import KeyLike
from lmtier.store import TieredStore
from lmtier.tiers import DiskTier

from conftest import tensor_for
from store_helpers import KIB, ROOM_TIMEOUT_S, DropLog

# tensor_for(...) is 1 KiB: cpu holds 4 entries.


def two_tiers(root: Path, disk: int = 16 * KIB) -> tuple[TieredStore, DropLog]:
    config = StoreConfig(
        tiers=(
            TierConfig("cpu", "memory", 4 * KIB),
            TierConfig("disk", "disk", disk, path=str(root / "disk")),
        )
    )
    drops = DropLog()
    return TieredStore(config, on_drop=drops), drops


@pytest.fixture
def disk_writes(monkeypatch: pytest.MonkeyPatch) -> list[KeyLike]:
    """The keys every disk tier writes, in order."""
    written: list[KeyLike] = []
    original = DiskTier._write

    async def counting(self: DiskTier, key: KeyLike, tensor: torch.Tensor) -> object:
        written.append(key)
        return await original(self, key, tensor)

    monkeypatch.setattr(DiskTier, "_write", counting)
    return written


async def fill_and_promote(store: TieredStore) -> None:
    """k0..k3 on disk, k4..k7 in cpu; then a get copies k0 up (k4 goes down)."""
    for i in range(8):
        await store.put(f"k{i}", tensor_for(f"k{i}"))
    assert await store.contains("k0") == "disk"
    got = await store.get("k0")
    assert got is not None and torch.equal(got, tensor_for("k0"))
    assert await store.contains("k0") == "cpu"
    assert store.tiers[1].lookup("k0") is not None  # the clean copy


def files(root: Path) -> int:
    return sum(1 for _ in (root / "disk").rglob("*.safetensors"))


async def test_an_entry_demoted_unchanged_hands_over_to_its_clean_copy(
    tmp_path: Path, disk_writes: list[KeyLike]
) -> None:
    store, drops = two_tiers(tmp_path)
    async with store:
        await fill_and_promote(store)
        disk_writes.clear()
        for i in range(4):  # evicts k5, k6, k7 and k0 from cpu
            await store.put(f"n{i}", tensor_for(f"n{i}"))
        assert sorted(disk_writes) == ["k5", "k6", "k7"]  # k0: nothing written
        assert await store.contains("k0") == "disk"
        stats = store.stats()
        cpu, disk = stats["tiers"]["cpu"], stats["tiers"]["disk"]
        assert cpu["unwritten_demotions"] == 1 and cpu["demotions_out"] == 9
        assert disk["demotions_in"] == 8  # each arrived by a write but k0, already there
        assert disk["clean_copies"] == 0 and stats["entries"] == 12 and drops.keys == []
        got = await store.get("k0")
        assert got is not None and torch.equal(got, tensor_for("k0"))
        assert store.audit() == []


async def test_a_put_removes_every_copy(tmp_path: Path, disk_writes: list[KeyLike]) -> None:
    store, _ = two_tiers(tmp_path)
    async with store:
        await fill_and_promote(store)
        before = files(tmp_path)
        new = tensor_for("k0", version=1)
        await store.put("k0", new)
        assert store.tiers[1].lookup("k0") is None and files(tmp_path) == before - 1
        disk_writes.clear()
        for i in range(4):  # k0's new value leaves cpu: it must be written, not handed over
            await store.put(f"n{i}", tensor_for(f"n{i}"))
        assert "k0" in disk_writes
        got = await store.get("k0")
        assert got is not None and torch.equal(got, new)
        assert store.stats()["tiers"]["cpu"]["unwritten_demotions"] == 0
        assert store.audit() == []


async def test_a_delete_removes_every_copy_across_a_restart(tmp_path: Path) -> None:
    store, _ = two_tiers(tmp_path)
    async with store:
        await fill_and_promote(store)
        assert await store.delete("k0") is True
        assert await store.get("k0") is None
        assert all(tier.lookup("k0") is None for tier in store.tiers)
    reopened, _ = two_tiers(tmp_path)
    async with reopened:
        assert await reopened.get("k0") is None
        assert await reopened.contains("k1") == "disk"


async def test_a_restart_serves_the_clean_copy(tmp_path: Path) -> None:
    store, _ = two_tiers(tmp_path)
    async with store:
        await fill_and_promote(store)
    reopened, _ = two_tiers(tmp_path)
    async with reopened:
        assert await reopened.contains("k0") == "disk"
        got = await reopened.get("k0")
        assert got is not None and torch.equal(got, tensor_for("k0"))


async def test_an_evicted_clean_copy_is_no_drop(tmp_path: Path) -> None:
    store, drops = two_tiers(tmp_path, disk=4 * KIB)
    async with store:
        await fill_and_promote(store)  # k4's demotion drops k1 (disk LRU: k1 k2 k3 k0 k4)
        assert drops.keys == ["k1"]
        for i in range(3):  # k5, k6, k7 go down: disk evicts k2, k3 and k0's clean copy
            await store.put(f"n{i}", tensor_for(f"n{i}"))
        assert drops.keys == ["k1", "k2", "k3"]
        assert store.stats()["tiers"]["disk"]["copies_evicted"] == 1
        assert await store.contains("k0") == "cpu"
        got = await store.get("k0")
        assert got is not None and torch.equal(got, tensor_for("k0"))
        assert store.audit() == []


async def test_exclusive_tiers_move_a_lower_hit_instead(
    tmp_path: Path, disk_writes: list[KeyLike]
) -> None:
    config = StoreConfig(
        tiers=(
            TierConfig("cpu", "memory", 4 * KIB),
            TierConfig("disk", "disk", 16 * KIB, path=str(tmp_path / "disk")),
        ),
        clean_copies=False,
    )
    async with TieredStore(config) as store:
        for i in range(8):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        await store.get("k0")
        assert store.tiers[1].lookup("k0") is None  # moved: one tier per key
        disk_writes.clear()
        for i in range(4):
            await store.put(f"n{i}", tensor_for(f"n{i}"))
        assert "k0" in disk_writes  # written back down
        assert store.stats()["tiers"]["disk"]["clean_copies"] == 0
        assert store.audit() == []


async def test_concurrent_gets_of_a_lower_key_copy_it_up_once(tmp_path: Path) -> None:
    store, _ = two_tiers(tmp_path)
    async with store:
        for i in range(8):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        got = await asyncio.gather(*(store.get("k0") for _ in range(8)))
        assert all(g is not None and torch.equal(g, tensor_for("k0")) for g in got)
        tiers = store.stats()["tiers"]
        assert tiers["cpu"]["promotions_in"] == 1 and tiers["disk"]["clean_copies"] == 1
        assert store.audit() == []


async def test_a_promotion_racing_the_demotion_of_its_source_leaves_no_stuck_entry(
    tmp_path: Path,
) -> None:
    """A three-tier store: a cpu entry is promoted to the top while cpu evicts it; whichever
    commits first, the cpu entry ends as a clean copy or gone, never stuck "leaving"."""
    config = StoreConfig(
        tiers=(
            TierConfig("top", "memory", 4 * KIB),
            TierConfig("cpu", "memory", 4 * KIB),
            TierConfig("disk", "disk", 16 * KIB, path=str(tmp_path / "disk")),
        )
    )
    async with TieredStore(config) as store:
        for i in range(8):  # k0..k3 in cpu, k4..k7 on top
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        # The get of k0 promotes it (evicting a top entry into cpu, which evicts k0 itself).
        got, *_ = await asyncio.gather(
            store.get("k0"), *(store.put(f"n{i}", tensor_for(f"n{i}")) for i in range(4))
        )
        assert got is not None and torch.equal(got, tensor_for("k0"))
        assert store.audit() == []
        again = await store.get("k0")
        assert again is not None and torch.equal(again, tensor_for("k0"))
        assert all(not tier.is_leaving("k0") for tier in store.tiers)


async def test_a_clean_copy_whose_file_vanished_is_dropped_and_reported(tmp_path: Path) -> None:
    """The copy below was removed behind the store's back before its entry handed over to it:
    the next get misses, the key is reported dropped, and the accounting holds."""
    store, drops = two_tiers(tmp_path)
    async with store:
        await fill_and_promote(store)
        copy = store.tiers[1].lookup("k0")
        Path(copy.path).unlink()  # hostile: the file goes while the store still indexes it
        for i in range(4):  # k0 leaves cpu, handing over to the missing copy: nothing written
            await store.put(f"n{i}", tensor_for(f"n{i}"))
        assert store.stats()["tiers"]["cpu"]["unwritten_demotions"] == 1
        assert await store.get("k0") is None
        assert "k0" in drops.keys and await store.contains("k0") is None
        assert store.audit() == []


async def test_a_victim_whose_copy_below_is_leaving_too_is_written_down_not_dropped(
    tmp_path: Path,
) -> None:
    """cpu (2 entries) -> disk (2 entries): ``a`` lives in cpu with a clean copy on disk.  The
    disk evicts that copy (its move held by a gate) while the cpu evicts ``a``: ``a`` waits
    for the copy to leave and is written down in its place; only one key of five is dropped."""
    config = StoreConfig(
        tiers=(
            TierConfig("cpu", "memory", 2 * KIB),
            TierConfig("disk", "disk", 2 * KIB, path=str(tmp_path / "disk")),
        ),
        room_timeout_s=ROOM_TIMEOUT_S,
    )
    drops = DropLog()
    async with TieredStore(config, on_drop=drops) as store:
        disk = store.tiers[1]
        for key in ("a", "b", "c"):  # a goes down to disk
            await store.put(key, tensor_for(key))
        assert await store.get("a") is not None  # promoted: b goes down, a's copy stays
        await store.settle()
        assert (store.holder("a"), disk.lookup("a") is not None) == ("cpu", True)
        held, release = asyncio.Event(), asyncio.Event()
        mover = store._mover
        demote_one = mover._demote_one

        async def gated(tier: Any, below: Any, key: Any, obj: Any, staged: Any = None) -> None:
            if tier is disk and key == "a":
                held.set()
                await release.wait()
            await demote_one(tier, below, key, obj, staged)

        mover._demote_one = gated  # type: ignore[method-assign]
        # c goes down: the disk evicts a's copy, held leaving.
        spill = asyncio.ensure_future(store.put("x", tensor_for("x")))
        await asyncio.wait_for(held.wait(), ROOM_TIMEOUT_S)
        # a goes down while its copy below is leaving.
        evict_a = asyncio.ensure_future(store.put("y", tensor_for("y")))
        await asyncio.wait([evict_a], timeout=0.3)
        release.set()
        await asyncio.wait_for(asyncio.gather(spill, evict_a), ROOM_TIMEOUT_S)
        await store.settle()
        assert "a" not in drops.keys, "a was dropped though the disk could take it"
        assert len(drops.keys) == 1  # five keys, room for four
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("a"))
        assert store.audit() == []
