"""``Tier.place``: a slot commits an entry whole, or undoes itself and leaves nothing."""

from __future__ import annotations

import asyncio
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier.keys import KeyLike
from lmtier.metrics import TierCounters
from lmtier.testing import lru, store_in
from lmtier.tiers import DiskTier, MemoryTier, Tier
from lmtier.tiers.base import Arrival
from lmtier.tiers.placing import Placing

from conftest import tensor_for

KIB = 1024  # bytes of tensor_for(key)
LMTIER = Path(__file__).resolve().parents[1] / "lmtier"


@pytest.fixture(params=["memory", "disk"])
async def make_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    async def make(budget: int) -> Tier:
        if request.param == "memory":
            return MemoryTier("cpu", lru(budget), torch.device("cpu"))
        tier = DiskTier("disk", lru(budget), tmp_path / "disk")
        await tier.open()
        return tier

    return make


def files_of(tier: Tier) -> list[Path]:
    """The files a disk tier holds (temp files included); [] for a memory tier."""
    if not isinstance(tier, DiskTier):
        return []
    return sorted(p for p in tier.root.rglob("*") if p.is_file() and p.name != ".lock")


def assert_untouched(tier: Tier, files_before: list[Path]) -> None:
    assert tier.lookup("k") is None
    assert (
        tier.evictor.charged_bytes
        == tier.resident_bytes
        == sum(size for _, size in tier.entry_sizes())
    )
    assert tier.audit(quiescent=True) == []
    assert files_of(tier) == files_before


async def test_a_committed_slot_is_visible_and_counted(make_tier: Any) -> None:
    tier = await make_tier(4 * KIB)
    async with tier.place("k", KIB, Arrival.DEMOTION) as slot:
        assert slot.victims == []
        await slot.reserve(timeout=1)
        obj = await slot.write(tensor_for("k"))
        assert tier.lookup("k") is None, "visible before its commit"
        slot.publish()
        slot.commit()
    assert tier.lookup("k") is obj
    assert tier.counters.demotions_in == 1 and tier.counters.bytes_in == KIB
    assert tier.counters.puts == 0
    loaded = await tier.load(obj)
    assert loaded is not None and torch.equal(loaded.cpu(), tensor_for("k"))
    assert tier.audit(quiescent=True) == []


@pytest.mark.parametrize("stop_after", ["admit", "reserve", "write", "publish"])
async def test_a_slot_left_without_commit_undoes_itself(make_tier: Any, stop_after: str) -> None:
    tier = await make_tier(4 * KIB)
    await store_in(tier, "other", tensor_for("other"))
    before = files_of(tier)
    async with tier.place("k", KIB) as slot:
        assert tier.evictor.charged_bytes == 2 * KIB
        if stop_after != "admit":
            await slot.reserve(timeout=1)
            assert tier.resident_bytes == 2 * KIB
        if stop_after in ("write", "publish"):
            await slot.write(tensor_for("k"))
        if stop_after == "publish":
            slot.publish()
    assert_untouched(tier, before)
    assert tier.lookup("other") is not None and tier.counters.puts == 1


async def test_an_exception_in_the_block_undoes_the_slot_and_propagates(make_tier: Any) -> None:
    tier = await make_tier(4 * KIB)
    before = files_of(tier)
    with pytest.raises(KeyError, match="boom"):
        async with tier.place("k", KIB) as slot:
            await slot.reserve(timeout=1)
            await slot.write(tensor_for("k"))
            raise KeyError("boom")
    assert_untouched(tier, before)


async def test_a_failed_write_gives_back_the_reservation(
    make_tier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = await make_tier(4 * KIB)
    before = files_of(tier)

    async def fail(key: KeyLike, tensor: torch.Tensor) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tier, "_write", fail)
    with pytest.raises(OSError, match="No space"):
        async with tier.place("k", KIB) as slot:
            await slot.reserve(timeout=1)
            await slot.write(tensor_for("k"))
    assert_untouched(tier, before)


async def test_a_slot_cancelled_while_waiting_for_room_undoes_itself(make_tier: Any) -> None:
    tier = await make_tier(KIB)
    await store_in(tier, "a", tensor_for("a"))
    reserving = asyncio.Event()

    async def place() -> None:
        async with tier.place("k", KIB) as slot:
            assert slot.victims is not None and [k for k, _ in slot.victims] == ["a"]
            reserving.set()
            await slot.reserve(timeout=60)  # "a" is leaving but never removed: waits

    task = asyncio.create_task(place())
    await asyncio.wait_for(reserving.wait(), 10)
    await asyncio.sleep(0)
    assert not task.done() and tier.resident_bytes == KIB
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tier.evictor.charged_bytes == 0, "only the leaving victim's bytes remain, uncharged"
    await tier.discard(tier.remove("a"))
    assert tier.audit(quiescent=True) == [] and tier.resident_bytes == 0


async def test_the_budget_holds_while_a_slot_writes(
    make_tier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = await make_tier(2 * KIB)
    writing, release = asyncio.Event(), asyncio.Event()
    write = tier._write

    async def gated(key: KeyLike, tensor: torch.Tensor) -> Any:
        writing.set()
        await release.wait()
        return await write(key, tensor)

    monkeypatch.setattr(tier, "_write", gated)
    task = asyncio.create_task(store_in(tier, "k", tensor_for("k")))
    await asyncio.wait_for(writing.wait(), 10)
    assert tier.resident_bytes == KIB, "the write's bytes are reserved while it runs"
    async with tier.place("j", 2 * KIB) as slot:
        assert slot.victims is None, "the evictor refused what the reservation holds"
    assert tier.audit() == []
    release.set()
    await asyncio.wait_for(task, 10)
    assert tier.lookup("k") is not None and tier.audit(quiescent=True) == []


async def test_a_refused_slot_holds_nothing(make_tier: Any) -> None:
    tier = await make_tier(KIB)
    async with tier.place("big", 2 * KIB) as slot:
        assert slot.victims is None
        with pytest.raises(RuntimeError, match="reserve"):
            await slot.reserve(timeout=1)
    assert tier.evictor.charged_bytes == 0 and tier.audit(quiescent=True) == []


async def test_steps_out_of_order_are_refused(make_tier: Any) -> None:
    tier = await make_tier(4 * KIB)
    async with tier.place("k", KIB) as slot:
        with pytest.raises(RuntimeError, match="before reserve"):
            await slot.write(tensor_for("k"))
        await slot.reserve(timeout=1)
        with pytest.raises(RuntimeError, match="before a write"):
            slot.commit()
    assert tier.audit(quiescent=True) == []


async def test_placing_reserves_only_once_the_victims_are_gone() -> None:
    tier = MemoryTier("cpu", lru(KIB), torch.device("cpu"))
    await store_in(tier, "a", tensor_for("a"))
    with Placing(tier, "k", KIB, Arrival.PROMOTION) as placing:
        assert placing.victims is not None and [k for k, _ in placing.victims] == ["a"]
        assert not placing.reserve_now(), "room taken while the victim still holds it"
        tier.remove("a")
        assert placing.reserve_now()
        placing.commit(torch.zeros(KIB, dtype=torch.uint8))
    assert tier.lookup("k") is not None and tier.counters.promotions_in == 1
    with Placing(tier, "j", KIB) as placing:  # left without commit: undone
        assert placing.victims is not None
    assert tier.is_leaving("k")  # its victim is the caller's to move; the charge is given back
    tier.remove("k")
    assert tier.audit(quiescent=True) == [] and tier.evictor.charged_bytes == 0


def test_no_tier_counter_is_written_outside_the_tiers() -> None:
    """The store and the tools report events to a tier; only the tier writes its counters."""
    names = "|".join(field.name for field in fields(TierCounters))
    write = re.compile(
        rf"\bcounters\.({names})\s*[-+]?=(?!=)|\bcounters\.count\(|setattr\([^)]*counters"
    )
    found = [
        f"{path.relative_to(LMTIER)}:{number}: {line.strip()}"
        for path in LMTIER.rglob("*.py")
        if path.relative_to(LMTIER).parts[0] != "tiers"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if write.search(line)
    ]
    assert found == []
    assert write.search("tier.counters.hits += 1"), "the pattern finds a counter write"
