"""Many tasks at once on small budgets, and races injected inside tier I/O."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import PutStatus
from lmtier.keys import KeyLike
from lmtier.store import TieredStore
from lmtier.tiers.base import Tier

from conftest import tensor_for
from store_helpers import KIB, make_store

TASKS = 32
OPS_PER_TASK = 320
KEYS_PER_TASK = 6


async def test_many_tasks_keep_every_invariant(tmp_path: Path) -> None:
    """32 tasks, 10k mixed ops, spills all the time; invariants checked after every op."""
    seq = 0
    drop_seq: dict[KeyLike, int] = {}

    def on_drop(key: KeyLike) -> None:
        drop_seq[key] = seq

    store, _ = make_store(tmp_path, top=6 * KIB, middle=12 * KIB, disk=24 * KIB)
    store.on_drop = on_drop
    wrong: list[str] = []
    refused: list[str] = []
    budget_breaches: list[str] = []

    async def worker(task: int) -> None:
        nonlocal seq
        rng = random.Random(task)
        last: dict[str, tuple[int, torch.Tensor | None]] = {}  # key -> (seq at put, value)
        for op in range(OPS_PER_TASK):
            key = f"t{task}-{rng.randrange(KEYS_PER_TASK)}"
            roll = rng.random()
            seq += 1
            if roll < 0.45:
                tensor = tensor_for(key, op, rng.choice((128, 256, 512, 1024)))
                started = seq
                if await store.put(key, tensor) is PutStatus.LEGAL:
                    last[key] = (started, tensor)
                else:  # refused: every tier was full of entries in use; the old value stays
                    refused.append(key)
            elif roll < 0.9:
                got = await store.get(key)
                started, expected = last.get(key, (0, None))
                if expected is None:
                    if got is not None:
                        wrong.append(f"{key}: deleted key read back")
                elif got is None:
                    if drop_seq.get(key, -1) < started:
                        wrong.append(f"{key}: lost without a drop")
                elif not torch.equal(got, expected):
                    wrong.append(f"{key}: wrong bytes")
            else:
                await store.delete(key)
                last[key] = (seq, None)
            problems = store.audit()
            if problems:
                budget_breaches.extend(problems)

    async with store:
        await asyncio.wait_for(asyncio.gather(*(worker(t) for t in range(TASKS))), 120)
        assert wrong == []
        assert budget_breaches == []
        assert len(refused) < TASKS * OPS_PER_TASK // 20
        stats = store.stats()["tiers"]
        assert stats["disk"]["drops"] > 0 and stats["gpu"]["demotions_out"] > 100
    assert store.audit() == []


def gate_writes(tier: Tier, block: Callable[[KeyLike], bool]) -> asyncio.Event:
    """Make ``tier``'s writes of keys that ``block`` selects wait for the returned event."""
    release = asyncio.Event()
    original = tier._write

    async def gated(key: KeyLike, tensor: torch.Tensor) -> Any:
        if block(key):
            await release.wait()
        return await original(key, tensor)

    tier._write = gated  # type: ignore[method-assign]
    return release


def one_tier_over_disk(tmp_path: Path, **kwargs: Any) -> TieredStore:
    store, _ = make_store(tmp_path, top=KIB, middle=KIB, disk=4 * KIB, **kwargs)
    del store.tiers[1]  # gpu (1 KiB) -> disk
    return store


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_an_entry_being_demoted_is_still_found(tmp_path: Path) -> None:
    store = one_tier_over_disk(tmp_path)
    async with store:
        gpu, disk = store.tiers
        await store.put("a", tensor_for("a"))
        release = gate_writes(disk, lambda key: key == "a")
        put_b = asyncio.create_task(store.put("b", tensor_for("b")))
        await settle()
        assert not put_b.done() and gpu.is_leaving("a")
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("a"))
        assert gpu.resident_bytes <= gpu.budget and store.audit() == []
        release.set()
        await put_b
        assert await store.contains("a") == "disk" and await store.contains("b") == "gpu"
        assert store.audit() == []


async def test_an_overwrite_during_demotion_wins(tmp_path: Path) -> None:
    store = one_tier_over_disk(tmp_path)
    async with store:
        _, disk = store.tiers
        await store.put("a", tensor_for("a"))
        first = True

        def first_write(key: KeyLike) -> bool:
            nonlocal first
            blocked, first = first, False
            return blocked

        release = gate_writes(disk, first_write)
        put_b = asyncio.create_task(store.put("b", tensor_for("b")))
        await settle()
        await store.put("a", tensor_for("a", version=2))  # gpu is full of pins: lands on disk
        release.set()
        await put_b
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("a", version=2))
        assert store.audit() == []
    files = list((tmp_path / "disk").rglob("*.safetensors"))
    assert len(files) == len(disk.cache_dict), "the stale demotion left its file"


async def test_a_delete_during_promotion_wins(tmp_path: Path) -> None:
    store = one_tier_over_disk(tmp_path)
    async with store:
        gpu, _ = store.tiers
        await store.put("a", tensor_for("a"))
        await store.put("b", tensor_for("b"))
        assert await store.contains("a") == "disk"
        release = gate_writes(gpu, lambda key: key == "a")
        get_a = asyncio.create_task(store.get("a"))
        await settle()
        assert await store.delete("a") is True
        release.set()
        got = await get_a
        assert got is not None and torch.equal(got, tensor_for("a"))  # read before the delete
        assert await store.contains("a") is None
        assert store.audit() == []


async def test_a_put_stuck_behind_a_demotion_times_out_to_the_next_tier(tmp_path: Path) -> None:
    store = one_tier_over_disk(tmp_path, room_timeout_s=0.1)
    async with store:
        gpu, disk = store.tiers
        await store.put("a", tensor_for("a"))
        release = gate_writes(disk, lambda key: key == "a")
        await asyncio.wait_for(store.put("b", tensor_for("b")), 5)
        assert await store.contains("b") == "disk"
        assert gpu.counters.room_timeouts == 1
        assert gpu.resident_bytes <= gpu.budget and store.audit() == []
        release.set()
    assert await_contains_after_close(store) == {"a": "disk", "b": "disk"}
    assert store.audit() == []


def await_contains_after_close(store: TieredStore) -> dict[str, str]:
    return {k: t.name for t in store.tiers for k in t.cache_dict}  # type: ignore[misc]


async def test_a_cancelled_put_leaves_exact_accounting(tmp_path: Path) -> None:
    store = one_tier_over_disk(tmp_path)
    async with store:
        _, disk = store.tiers
        await store.put("a", tensor_for("a"))
        release = gate_writes(disk, lambda key: True)
        put_b = asyncio.create_task(store.put("b", tensor_for("b")))
        await settle()
        put_b.cancel()
        await settle()
        release.set()
    assert store.audit() == []
    assert sum(len(t.cache_dict) for t in store.tiers) == 2  # the move was finished, not torn


async def test_an_error_inside_a_put_reaches_its_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = one_tier_over_disk(tmp_path)
    async with store:
        top = store.tiers[0]

        def broken_admit(*args: object) -> None:
            raise RuntimeError("evictor bug")

        monkeypatch.setattr(top, "admit", broken_admit)
        with pytest.raises(RuntimeError, match="evictor bug"):
            await store.put("a", tensor_for("a"))
        monkeypatch.undo()
        assert await store.put("a", tensor_for("a")) is PutStatus.LEGAL
        assert store.audit() == []
