"""The store's methods for adapters: keys, holder, touch (a hit without a read), tier_infos."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import pytest

from lmtier.config import StoreConfig, TierConfig
from lmtier.store import TieredStore

from conftest import tensor_for
from store_helpers import KIB

CHUNK = KIB


def two_tiers(root: Path) -> StoreConfig:
    """A top tier of two chunks over a disk tier that admits a key's second offer only."""
    return StoreConfig(
        tiers=(
            TierConfig("top", "memory", 2 * CHUNK),
            TierConfig("disk", "disk", 8 * CHUNK, path=str(root / "disk"), admission="second_hit"),
        ),
        promote_on_hit=False,
    )


async def test_keys_and_holder_read_the_index(tmp_path: Path) -> None:
    async with TieredStore(two_tiers(tmp_path)) as store:
        assert store.keys() == [] and store.holder("a") is None
        await store.put("a", tensor_for("a"))
        await store.put("b", tensor_for("b"))
        assert sorted(map(str, store.keys())) == ["a", "b"]
        assert store.holder("a") == "top" and await store.contains("a") == "top"
        await store.delete("a")
        assert store.keys() == ["b"] and store.holder("a") is None


async def test_touch_counts_a_hit_as_a_get_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with TieredStore(two_tiers(tmp_path)) as store:
        seen: list[tuple[Hashable, int]] = []
        disk_admission = store.tiers[1].admission
        monkeypatch.setattr(disk_admission, "observe", lambda key, size: seen.append((key, size)))
        await store.put("a", tensor_for("a"))
        await store.put("b", tensor_for("b"))
        before = {info.name: dict(info.counters) for info in store.tier_infos()}
        assert store.touch("a") == "top"
        assert store.touch("missing") is None
        after = {info.name: dict(info.counters) for info in store.tier_infos()}
        assert after["top"]["hits"] == before["top"]["hits"] + 1
        assert after["top"]["bytes_out"] == before["top"]["bytes_out"] + CHUNK
        assert seen == [("a", CHUNK)]  # the admission policies learn of the hit
        # The evictor saw the hit: the next put evicts "b", the least recently used.
        await store.put("c", tensor_for("c"))
        assert store.holder("a") == "top" and store.holder("b") != "top"


async def test_tier_infos_describe_each_tier(tmp_path: Path) -> None:
    async with TieredStore(two_tiers(tmp_path)) as store:
        await store.put("a", tensor_for("a"))
        top, disk = store.tier_infos()
        assert (top.name, top.kind, top.budget, top.shared) == (
            "top",
            "MemoryTier",
            2 * CHUNK,
            False,
        )
        assert (disk.name, disk.kind, disk.admission) == ("disk", "DiskTier", "second_hit")
        assert top.admission == "all" and top.available and disk.available
        assert top.resident_bytes == CHUNK and top.counters["puts"] == 1
        assert store.tier_stats()["top"]["entries"] == 1
