"""A writer killed with SIGKILL at random moments: reopening never serves a wrong byte."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import torch

from lmtier import StoreConfig, TierConfig, TieredStore
from lmtier.tiers import DiskTier
from lmtier.tiers.disk_files import TEMP_PREFIX

from store_helpers import kill_after_report, report_once

KIB = 1024
ROUNDS = 24


def content(key: str, numel: int) -> torch.Tensor:
    seed = sum(key.encode()) * 7919
    return (torch.arange(numel, dtype=torch.int64) * 40503 + seed).to(torch.int32)


def disk_store(root: Path) -> TieredStore:
    tiers = (TierConfig("disk", "disk", 96 * KIB, path=str(root)),)
    return TieredStore(StoreConfig(tiers))


def writer(root: Path, seed: int, calls: int, report: int) -> None:
    """Overwrite, delete and spill entries as fast as possible until killed; report once
    ``calls`` calls have returned."""
    torch.set_num_threads(1)
    reported = report_once(report)

    async def run() -> None:
        rng = random.Random(seed)
        async with disk_store(root) as store:
            for done in itertools.count():
                if done == calls:
                    reported()
                key = f"k{rng.randrange(40)}"
                if rng.random() < 0.1:
                    await store.delete(key)
                else:
                    await store.put(key, content(key, 256 * rng.randint(1, 8)))

    asyncio.run(run())


async def reopen_and_check(root: Path) -> tuple[int, int]:
    async with disk_store(root) as store:
        tier = store.tiers[0]
        assert isinstance(tier, DiskTier)
        assert not list(root.rglob(f"{TEMP_PREFIX}*")), "a temporary file survived the reopen"
        assert tier.recovery.unreadable == 0
        served = 0
        for key in list(tier.cache_dict):
            got = await store.get(key)
            if got is not None:
                assert torch.equal(got, content(str(key), got.numel())), f"{key}: wrong bytes"
                served += 1
        assert served + tier.counters.corrupt == tier.recovery.indexed
        assert store.audit() == []
        return served, tier.counters.corrupt


def test_sigkill_at_random_moments_never_serves_wrong_bytes(tmp_path: Path) -> None:
    rng = random.Random(1234)
    served_total = 0
    for round_ in range(ROUNDS):
        kill_after_report(writer, (tmp_path, round_, rng.randrange(5, 120)))
        served, _corrupt = asyncio.run(reopen_and_check(tmp_path))
        served_total += served
    assert served_total > ROUNDS, "the writer never got anything to disk"
