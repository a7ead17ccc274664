"""The store's promises under an engine's load: bursts larger than a tier, overwrites in a full
tier, and deletes or overwrites that race a demotion and then a crash."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import PutStatus, StoreConfig, TierConfig, TieredStore
from lmtier.engine import ChunkSpec, KVCacheEngine
from lmtier.errors import (
    DeviceUnavailableError,
    InvalidValueError,
    LmtierTypeError,
    StorageError,
)
from lmtier.tiers.base import Tier

from conftest import tensor_for
from store_helpers import ROOM_TIMEOUT_S

KIB = 1024
CHUNK = 16 * KIB  # 4096 int32 values
BIG = 1 << 20  # written by a thread of its own, never queued behind another write


def chunk(key: str, version: int = 0) -> torch.Tensor:
    return tensor_for(key, version, CHUNK // 4)


class WakeupLog:
    """Every future a tier hands out to a waiting put, to check that each one was woken."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.waiters: list[asyncio.Future[None]] = []
        real = Tier.changed

        def changed(tier: Tier) -> asyncio.Future[None]:
            waiter = real(tier)
            self.waiters.append(waiter)
            return waiter

        monkeypatch.setattr(Tier, "changed", changed)

    def unwoken(self) -> int:
        return sum(not waiter.done() for waiter in self.waiters)


async def test_a_burst_larger_than_the_only_tier_waits_for_no_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """16 chunks into a tier of 4: each commit wakes the puts waiting for an evictable entry."""
    wakeups = WakeupLog(monkeypatch)
    config = StoreConfig((TierConfig("cpu", "memory", 4 * CHUNK),), room_timeout_s=ROOM_TIMEOUT_S)
    async with TieredStore(config) as store:
        items = [(f"k{i}", chunk(f"k{i}")) for i in range(16)]
        statuses = await store.put_many(items)
        assert statuses == [PutStatus.LEGAL] * 16
        assert store.stats()["tiers"]["cpu"]["room_timeouts"] == 0
        assert wakeups.waiters, "the burst never had to wait: it does not test the wake-ups"
        assert wakeups.unwoken() == 0
        for key, value in items[-4:]:
            got = await store.get(key)
            assert got is not None and torch.equal(got, value)
        assert store.audit() == []


async def test_concurrent_bursts_spill_to_disk_without_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four 16-chunk bursts into cpu(4) -> disk(16): all land, none waits out the timeout."""
    wakeups = WakeupLog(monkeypatch)
    config = StoreConfig(
        (
            TierConfig("cpu", "memory", 4 * CHUNK),
            TierConfig("disk", "disk", 16 * CHUNK, path=str(tmp_path)),
        ),
        room_timeout_s=ROOM_TIMEOUT_S,
    )
    async with TieredStore(config) as store:
        bursts = [[(f"r{r}k{i}", chunk(f"r{r}k{i}")) for i in range(16)] for r in range(4)]
        results = await asyncio.gather(*(store.put_many(burst) for burst in bursts))
        assert [s for statuses in results for s in statuses] == [PutStatus.LEGAL] * 64
        tiers = store.stats()["tiers"]
        assert tiers["cpu"]["room_timeouts"] == tiers["disk"]["room_timeouts"] == 0
        assert tiers["disk"]["entries"] == 16 and tiers["disk"]["drops"] == 44
        assert wakeups.unwoken() == 0
        assert store.audit() == []


async def test_overwriting_a_resident_key_in_a_full_tier_evicts_nothing_else() -> None:
    config = StoreConfig((TierConfig("cpu", "memory", 2 * CHUNK),))
    async with TieredStore(config) as store:
        await store.put("A", chunk("A"))
        await store.put("B", chunk("B"))
        assert await store.put("B", chunk("B", 1)) is PutStatus.LEGAL
        got_a, got_b = await store.get("A"), await store.get("B")
        assert got_a is not None and torch.equal(got_a, chunk("A"))
        assert got_b is not None and torch.equal(got_b, chunk("B", 1))
        assert store.stats()["tiers"]["cpu"]["evictions"] == 0
        assert store.audit() == []


async def test_overwrite_in_a_full_tier_with_a_lower_tier_writes_nothing_below(
    tmp_path: Path,
) -> None:
    config = StoreConfig(
        (
            TierConfig("cpu", "memory", 2 * CHUNK),
            TierConfig("disk", "disk", 2 * CHUNK, path=str(tmp_path)),
        )
    )
    async with TieredStore(config) as store:
        for key in ("A", "B"):
            await store.put(key, chunk(key))
        for version in range(1, 5):
            await store.put("B", chunk("B", version))
        disk = store.stats()["tiers"]["disk"]
        assert disk["demotions_in"] == 0 and disk["entries"] == 0
        assert await store.contains("A") == "cpu"


# ---------------------------------------------------------------- crash after a racing call
def _race_a_demotion_then_die(root: str, action: str) -> None:
    """Demote "victim" to disk, blocked inside its file write; meanwhile delete or overwrite
    it; then let the write finish and die (SIGKILL) the moment the move learns it is stale."""
    torch.set_num_threads(1)

    def chunk(key: str, version: int = 0) -> torch.Tensor:
        return tensor_for(key, version, BIG // 4)

    async def run() -> None:
        config = StoreConfig(
            (
                TierConfig("cpu", "memory", BIG),
                TierConfig("disk", "disk", 8 * BIG, path=root),
            )
        )
        async with TieredStore(config) as store:
            disk: Any = store.tiers[1]
            entered, gate = threading.Event(), threading.Event()
            write_file = disk._write_file
            blocked = []

            def slow_write(key: Any, tensor: torch.Tensor) -> Any:
                if not blocked:
                    blocked.append(key)
                    entered.set()
                    gate.wait(10)
                return write_file(key, tensor)

            disk._write_file = slow_write
            await store.put("victim", chunk("victim"))
            spill = asyncio.ensure_future(store.put("other", chunk("other")))
            assert await asyncio.to_thread(entered.wait, 10)
            if action == "delete":
                assert await store.delete("victim")
            else:
                assert await store.put("victim", chunk("victim", 1)) is PutStatus.LEGAL

            async def die(obj: Any) -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            disk.discard = die
            gate.set()
            await spill
            await asyncio.sleep(1)  # only if the stale move never discarded anything

    asyncio.run(run())


@pytest.mark.parametrize("action", ["delete", "overwrite"])
def test_a_call_that_raced_a_demotion_is_not_undone_by_a_crash(tmp_path: Path, action: str) -> None:
    fork = multiprocessing.get_context("fork")
    child = fork.Process(target=_race_a_demotion_then_die, args=(str(tmp_path), action))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL, "the child did not reach the stale move"

    async def reopen() -> torch.Tensor | None:
        config = StoreConfig((TierConfig("disk", "disk", 8 * BIG, path=str(tmp_path)),))
        async with TieredStore(config) as store:
            return await store.get("victim")

    got = asyncio.run(reopen())
    if action == "delete":
        assert got is None, "the deleted key came back after the crash"
    else:
        assert got is not None and torch.equal(got, tensor_for("victim", 1, BIG // 4))


# ---------------------------------------------------------------- pins that nobody releases
def _engine_over_one_tier(room_timeout_s: float, pin_lease_s: float | None) -> KVCacheEngine:
    config = StoreConfig((TierConfig("cpu", "memory", 4 * CHUNK),), room_timeout_s=room_timeout_s)
    spec = ChunkSpec("m", chunk_size=4)
    return KVCacheEngine(TieredStore(config), spec, token_dim=0, pin_lease_s=pin_lease_s)


async def _fill_and_leak_a_lookup(engine: KVCacheEngine) -> TieredStore:
    """Four chunks fill the tier; a lookup pins them all and is never followed up."""
    store = engine._store
    tokens = list(range(16))
    kv = torch.arange(16 * CHUNK // 16, dtype=torch.int32).reshape(16, -1)
    assert await engine.store(tokens, kv) == 16
    assert await engine.lookup(tokens) == 16
    return store


async def test_pins_show_in_stats_and_a_wait_they_cause_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = _engine_over_one_tier(room_timeout_s=0.3, pin_lease_s=None)
    async with await _fill_and_leak_a_lookup(engine) as store:
        stats = store.stats()
        assert stats["pinned_entries"] == 4 and stats["pinned_bytes"] == 4 * CHUNK
        assert await store.put("late", chunk("late")) is PutStatus.ILLEGAL
        assert store.stats()["tiers"]["cpu"]["room_timeouts"] == 1
        waits = [r.getMessage() for r in caplog.records if "found no room" in r.getMessage()]
        assert len(waits) == 1 and "4 entries, 65536 bytes pinned" in waits[0]
        engine.release(list(range(16)))
        assert store.stats()["pinned_entries"] == 0


async def test_a_lookup_never_followed_up_lets_go_when_its_lease_ends() -> None:
    engine = _engine_over_one_tier(room_timeout_s=ROOM_TIMEOUT_S, pin_lease_s=0.2)
    async with await _fill_and_leak_a_lookup(engine) as store:
        assert await store.put("late", chunk("late")) is PutStatus.LEGAL
        assert engine.pins_expired == 4 and store.stats()["pinned_entries"] == 0
        assert store.stats()["tiers"]["cpu"]["room_timeouts"] == 0
        engine.release(list(range(16)))  # after expiry: releases nothing twice
        assert store.audit() == []


# ---------------------------------------------------------------- smaller promises
async def test_a_get_onto_a_missing_device_fails_up_front_on_a_miss_too() -> None:
    async with TieredStore(StoreConfig((TierConfig("cpu", "memory", CHUNK),))) as store:
        await store.put("a", chunk("a"))
        for device in ("cuda", "cuda:7", "mps"):
            if device.startswith("cuda") and torch.cuda.is_available():
                continue
            for key in ("a", "missing"):
                with pytest.raises(DeviceUnavailableError):
                    await store.get(key, device)
        with pytest.raises(InvalidValueError):
            await store.get("a", "meta")
        with pytest.raises(InvalidValueError):
            await store.get("a", out=torch.zeros(CHUNK // 4, requires_grad=True))
        got = await store.get("a")
        assert got is not None and torch.equal(got, chunk("a"))


async def test_a_get_into_out_that_fails_its_check_leaves_no_bad_bytes(tmp_path: Path) -> None:
    config = StoreConfig((TierConfig("disk", "disk", 4 * CHUNK, path=str(tmp_path)),))
    async with TieredStore(config) as store:
        await store.put("a", chunk("a"))
        [path] = tmp_path.rglob("*.safetensors")
        raw = bytearray(path.read_bytes())
        raw[-CHUNK:] = bytes(CHUNK)  # the payload zeroed, then one byte set: a bad payload
        raw[-1] = 0x7F
        path.write_bytes(bytes(raw))
        out = torch.full((CHUNK // 4,), -1, dtype=torch.int32)
        assert await store.get("a", out=out) is None
        assert not out.view(torch.uint8).any(), "out holds the failed entry's bytes"
        assert store.stats()["corrupt"] == 1


async def test_a_put_cancelled_by_its_caller_never_replaces_a_later_put(tmp_path: Path) -> None:
    """The cancelled put finishes in the background (moves never stop halfway), but a put
    called after it wins: the older value never lands over the newer one."""
    config = StoreConfig((TierConfig("disk", "disk", 4 * BIG, path=str(tmp_path)),))
    async with TieredStore(config) as store:
        disk: Any = store.tiers[0]
        gate = threading.Event()
        write_file = disk._write_file

        def first_write_waits(key: Any, tensor: torch.Tensor) -> Any:
            if tensor[0] == chunk("k", 1)[0]:
                gate.wait(10)
            return write_file(key, tensor)

        disk._write_file = first_write_waits
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.put("k", torch.cat([chunk("k", 1)] * 64)), 0.05)
        assert await store.put("k", chunk("k", 2)) is PutStatus.LEGAL
        gate.set()
        await asyncio.sleep(0.3)
    async with TieredStore(config) as store:
        got = await store.get("k")
        assert got is not None and torch.equal(got, chunk("k", 2))
        assert len(list(tmp_path.rglob("*.safetensors"))) == 1


async def test_an_error_of_the_environment_is_one_miss_and_never_strands_a_victim(
    tmp_path: Path,
) -> None:
    """A read failing with EMFILE: the get misses after one try and the entry stays; a
    demotion whose read fails so evicts its victim all the same (the put gets its room)."""
    import errno

    config = StoreConfig(
        (
            TierConfig("disk", "disk", 2 * CHUNK, path=str(tmp_path / "d")),
            TierConfig("disk2", "disk", 8 * CHUNK, path=str(tmp_path / "d2")),
        ),
        room_timeout_s=ROOM_TIMEOUT_S,
    )
    async with TieredStore(config) as store:
        disk: Any = store.tiers[0]
        await store.put("a", chunk("a"))
        await store.put("b", chunk("b"))
        read_file = disk._read_file

        def emfile(*args: Any) -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        disk._read_file = emfile
        disk._read_cached = lambda *args: None  # the loop could not open it either
        assert await store.get("a") is None
        assert disk.counters.errors == 1 and await store.contains("a") == "disk"
        assert await store.put("c", chunk("c")) is PutStatus.LEGAL  # evicts "a", unreadable
        assert disk.counters.room_timeouts == 0 and disk.counters.drops == 1
        disk._read_file = read_file
        del disk._read_cached
        got = await store.get("b")
        assert got is not None and torch.equal(got, chunk("b"))
        assert store.audit() == []


# ---------------------------------------------------------------- operator-facing messages
async def test_a_plain_mapping_is_a_config(tmp_path: Path) -> None:
    mapping = {"tiers": [{"name": "cpu", "kind": "memory", "max_size_gb": 0.001}]}
    async with TieredStore(mapping) as store:
        assert await store.put("a", chunk("a")) is PutStatus.LEGAL
    with pytest.raises(LmtierTypeError):
        TieredStore(["not", "a", "config"])  # type: ignore[arg-type]


def test_a_store_never_closed_warns_and_its_folder_error_says_why(tmp_path: Path) -> None:
    import gc

    config = StoreConfig((TierConfig("disk", "disk", CHUNK, path=str(tmp_path)),))
    store = TieredStore(config)
    asyncio.run(store.open())
    with pytest.raises(StorageError, match="never closed"):
        asyncio.run(TieredStore(config).open())
    with pytest.warns(ResourceWarning, match="never closed"):
        del store
        gc.collect()


async def test_a_budget_beyond_the_free_space_and_a_full_disk_are_told_briefly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno

    config = StoreConfig((TierConfig("disk", "disk", 1 << 62, path=str(tmp_path)),))
    async with TieredStore(config) as store:
        (told,) = [r.getMessage() for r in caplog.records if "exceeds the" in r.getMessage()]
        assert "budget (4096 PiB, 0 B held)" in told, told  # readable sizes
        disk: Any = store.tiers[0]

        def full(*args: Any) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        disk._write_file = full
        for i in range(41):
            assert await store.put(f"k{i}", chunk("k")) is PutStatus.ILLEGAL
        failures = [r for r in caplog.records if "could not write" in r.getMessage()]
        assert disk.counters.errors == 41 and len(failures) == 6  # the 1st, 2nd, 4th ... 32nd
