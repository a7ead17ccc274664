"""``write_ahead``: a nearly full memory tier copies its next victims down in the background, so
the puts that evict them write nothing.  Copies race overwrites, deletes, evictions and a full
disk here, each held mid-write by a gate inside the disk tier's write."""

from __future__ import annotations

import asyncio
import errno
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import PutStatus
from lmtier.cli.stress.run import StressOptions, shared_stress_config
from lmtier.cli.stress.shared import run_shared_stress
from lmtier.config import StoreConfig, TierConfig
from lmtier.evictor import LRUEvictor, evictor_names, make_evictor
from lmtier.keys import KeyLike
from lmtier.store import TieredStore
from lmtier.tiers import DiskTier

from conftest import tensor_for
from store_helpers import KIB, ROOM_TIMEOUT_S, DropLog

# tensor_for(...) is 1 KiB: the cpu tier holds 4 entries.


def config(root: Path, write_ahead: bool = True) -> StoreConfig:
    return StoreConfig(
        tiers=(
            TierConfig("cpu", "memory", 4 * KIB),
            TierConfig("disk", "disk", 64 * KIB, path=str(root / "disk")),
        ),
        write_ahead=write_ahead,
        room_timeout_s=ROOM_TIMEOUT_S,
    )


class Gate:
    """Holds the disk writes of chosen keys until released; records every key written."""

    def __init__(self) -> None:
        self.held: set[KeyLike] = set()
        self.reached: dict[KeyLike, asyncio.Event] = {}
        self.release = asyncio.Event()
        self.written: list[KeyLike] = []

    def hold(self, key: KeyLike) -> asyncio.Event:
        self.held.add(key)
        return self.reached.setdefault(key, asyncio.Event())


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    made = Gate()
    original = DiskTier._write

    async def gated(self: DiskTier, key: KeyLike, tensor: torch.Tensor) -> object:
        made.written.append(key)
        if key in made.held:
            made.held.discard(key)
            made.reached[key].set()
            await made.release.wait()
        return await original(self, key, tensor)

    monkeypatch.setattr(DiskTier, "_write", gated)
    yield made


async def settle(store: TieredStore) -> None:
    """Wait for the copies in flight (background tasks) to end."""
    while store._ledger.writing_ahead:
        await asyncio.sleep(0.001)


async def test_every_victim_is_written_once_and_its_put_writes_nothing(
    tmp_path: Path, gate: Gate
) -> None:
    drops = DropLog()
    async with TieredStore(config(tmp_path), on_drop=drops) as store:
        for i in range(16):
            assert await store.put(f"k{i}", tensor_for(f"k{i}")) is PutStatus.LEGAL
        await settle(store)
        counts = Counter(gate.written)
        assert counts and max(counts.values()) == 1, f"a key written twice: {counts}"
        stats = store.stats()["tiers"]
        assert stats["cpu"]["demotions_out"] == 12
        assert stats["cpu"]["unwritten_demotions"] == 12, "every victim's copy was there first"
        assert stats["disk"]["written_ahead"] == len(counts) and stats["disk"]["demotions_in"] == 0
        for i in range(16):
            got = await store.get(f"k{i}")
            assert got is not None and torch.equal(got, tensor_for(f"k{i}")), i
        assert store.audit() == [] and drops.keys == []


async def test_without_write_ahead_victims_are_written_when_they_leave(
    tmp_path: Path, gate: Gate
) -> None:
    async with TieredStore(config(tmp_path, write_ahead=False)) as store:
        for i in range(16):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        assert gate.written == [f"k{i}" for i in range(12)]
        assert store.stats()["tiers"]["disk"]["written_ahead"] == 0


async def test_a_victim_whose_copy_is_on_its_way_waits_for_it(tmp_path: Path, gate: Gate) -> None:
    async with TieredStore(config(tmp_path)) as store:
        reached = gate.hold("k0")
        for i in range(4):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        await asyncio.wait_for(reached.wait(), 5)  # k0's copy is held mid-write
        put = asyncio.create_task(store.put("n", tensor_for("n")))  # evicts k0
        await asyncio.sleep(0.05)
        assert not put.done(), "the put waits for k0's copy rather than writing k0 again"
        assert await store.contains("k0") == "cpu"
        gate.release.set()
        assert await put is PutStatus.LEGAL
        await settle(store)
        assert Counter(gate.written)["k0"] == 1
        assert await store.contains("k0") == "disk"
        assert store.stats()["tiers"]["cpu"]["unwritten_demotions"] >= 1
        got = await store.get("k0")
        assert got is not None and torch.equal(got, tensor_for("k0"))
        assert store.audit() == []


@pytest.mark.parametrize("change", ["overwrite", "delete"])
async def test_a_copy_that_a_put_or_delete_made_stale_is_never_served(
    tmp_path: Path, gate: Gate, change: str
) -> None:
    async with TieredStore(config(tmp_path)) as store:
        reached = gate.hold("k0")
        for i in range(4):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        await asyncio.wait_for(reached.wait(), 5)
        if change == "overwrite":
            await store.put("k0", tensor_for("k0", version=1))
        else:
            assert await store.delete("k0") is True
        gate.release.set()
        await settle(store)
        got = await store.get("k0")
        if change == "overwrite":
            assert got is not None and torch.equal(got, tensor_for("k0", version=1))
        else:
            assert got is None
        assert store.tiers[1].lookup("k0") is None, "the stale copy was not committed"
        assert store.audit() == []
    # Across a restart (memory lost), the disk must not bring back the value replaced.
    async with TieredStore(config(tmp_path)) as reopened:
        assert await reopened.get("k0") is None
        for i in range(1, 4):  # the copies that went through are served
            got = await reopened.get(f"k{i}")
            assert got is not None and torch.equal(got, tensor_for(f"k{i}"))


async def test_a_copy_that_fails_leaves_the_demotion_to_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writev = os.writev
    failures = 0

    def full_once(fd: int, buffers: Any) -> int:
        nonlocal failures
        if not failures:
            failures += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, buffers)

    drops = DropLog()
    async with TieredStore(config(tmp_path), on_drop=drops) as store:
        monkeypatch.setattr(os, "writev", full_once)  # strikes the first copy written ahead
        for i in range(4):  # the puts into cpu write nothing to disk themselves
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        await settle(store)
        monkeypatch.undo()
        for i in range(4, 8):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        await settle(store)
        assert failures == 1 and store.tiers[1].counters.errors == 1
        for i in range(8):
            got = await store.get(f"k{i}")
            assert got is not None and torch.equal(got, tensor_for(f"k{i}")), i
        assert drops.keys == [] and store.audit() == []
    assert not list((tmp_path / "disk").rglob(".tmp-*"))


async def test_nothing_is_written_ahead_into_a_tier_with_an_admission_policy(
    tmp_path: Path, gate: Gate
) -> None:
    """A copy's offer would be the key's first: second_hit would admit its demotion."""
    base = config(tmp_path)
    disk = TierConfig("disk", "disk", 64 * KIB, path=str(tmp_path / "disk"), admission="second_hit")
    async with TieredStore(StoreConfig((base.tiers[0], disk), write_ahead=True)) as store:
        for i in range(8):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        assert store.tiers[1].counters.written_ahead == 0 and gate.written == []
        assert store.tiers[1].counters.admission_rejects == 4  # each victim offered once


async def test_shared_keys_stress_with_write_ahead_is_clean(tmp_path: Path) -> None:
    base = shared_stress_config(tmp_path)
    stress_config = StoreConfig(base.tiers, write_ahead=True, room_timeout_s=base.room_timeout_s)
    options = StressOptions(
        tasks=32, ops=800, keys_per_task=48, progress=False, shared_keys=True, rounds=2
    )
    async with TieredStore(stress_config) as store:
        report = await run_shared_stress(store, options)
        written_ahead = sum(t.counters.written_ahead for t in store.tiers)
    assert report.problems == []
    assert report.wrong_reads == report.audit_failures == report.budget_breaches == 0
    assert report.raw_exceptions == 0 and report.verified > 0
    assert written_ahead > 0, "the stress never wrote ahead: it proves nothing of it"


def test_lru_names_its_next_victims_without_choosing_them() -> None:
    evictor = LRUEvictor(max_cache_bytes=4 * KIB)
    cache: OrderedDict[Any, Any] = OrderedDict()
    for key in "abcd":
        evictor.update_on_put(cache, KIB, key)
        cache[key] = torch.zeros(KIB, dtype=torch.uint8)
    evictor.update_on_get("a", cache)  # a is now the most recent
    evictor.pin("b")
    charged = evictor.charged_bytes
    assert evictor.next_victims(cache, 2 * KIB) == ["c", "d"]
    assert evictor.next_victims(cache, 0) == []  # room left for nothing more: no victim
    assert evictor.next_victims(cache, 8 * KIB) == []  # more than it could ever hold
    assert evictor.charged_bytes == charged and list(cache) == ["b", "c", "d", "a"]
    assert evictor.update_on_put(cache, 2 * KIB)[0] == ["c", "d"]  # what it then picks


@pytest.mark.parametrize("name", sorted(set(evictor_names()) - {"lru"}))
def test_other_policies_name_no_victims_ahead(name: str) -> None:
    evictor = make_evictor(name, 4 * KIB)
    cache: OrderedDict[Any, Any] = OrderedDict()
    for key in "abcd":
        evictor.update_on_put(cache, KIB, key)
        cache[key] = torch.zeros(KIB, dtype=torch.uint8)
    assert evictor.next_victims(cache, 2 * KIB) == []
