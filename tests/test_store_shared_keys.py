"""Puts of one key that overlap, against every registered evictor policy."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lmtier import PutStatus
from lmtier.config import StoreConfig, TierConfig
from lmtier.evictor import evictor_names
from lmtier.store import TieredStore

MIB = 1 << 20


def _bytes(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.uint8)


@pytest.mark.parametrize("policy", evictor_names())
@pytest.mark.parametrize(
    "sizes", [(8 * MIB, 4096), (4096, 8 * MIB)], ids=["big-first", "small-first"]
)
async def test_overlapping_puts_of_one_key_then_a_fill_keep_the_accounting(
    policy: str, sizes: tuple[int, int]
) -> None:
    config = StoreConfig((TierConfig("cpu", "memory", 64 * MIB, evictor=policy, pinned=False),))
    async with TieredStore(config) as store:
        statuses = await asyncio.gather(*(store.put("k", _bytes(size)) for size in sizes))
        assert statuses == [PutStatus.LEGAL, PutStatus.LEGAL]
        assert store.audit() == []
        for i in range(48):  # three turnovers of the tier: k is a victim on the way
            assert await store.put(f"fill{i}", _bytes(4 * MIB)) is PutStatus.LEGAL
            assert store.audit() == [], i
        tier = store.tiers[0]
        assert tier.evictor.charged_bytes == tier.resident_bytes <= tier.budget
