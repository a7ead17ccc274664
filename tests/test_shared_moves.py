"""A move into a redis tier writes the server's value before it commits: a put or delete of
the key that makes the move stale must not return while that write may still be there.

A gate inside the remote tier's SET of the moved key holds the move either before the SET is
issued or after it landed on the server (the move not yet awake to see that it went stale).
Meanwhile a delete or an overwrite of the key runs; whenever it has returned, a second store
on the same server (what a restart or another instance would be) must not find the old value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import PutStatus
from lmtier.config import StoreConfig, TierConfig
from lmtier.keys import KeyLike
from lmtier.store import TieredStore
from lmtier.tiers.remote import RemoteTier

from conftest import tensor_for
from redis_helpers import RedisProcess, remote_spec
from store_helpers import KIB, ROOM_TIMEOUT_S

pytestmark = pytest.mark.redis

# How long a call that must wait is given to (wrongly) return: the buggy one returns at once.
SETTLE_S = 0.3
WAIT_S = 60.0
MOVED = "k0"


class SetGate:
    """Holds the first SET of ``key``: before it is issued until ``issue`` is set, and after it
    landed on the server until ``wake`` is set."""

    def __init__(self, key: KeyLike) -> None:
        self.key = key
        self.held = asyncio.Event()  # the SET reached the gate
        self.issue = asyncio.Event()
        self.landed = asyncio.Event()  # the SET is on the server
        self.wake = asyncio.Event()
        self.used = False

    def open(self) -> None:
        self.issue.set()
        self.wake.set()


@pytest.fixture
def set_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[SetGate]:
    gate = SetGate(MOVED)
    original = RemoteTier._in_order

    async def gated(self: RemoteTier, key: KeyLike, name: str, *args: Any, **kw: Any) -> Any:
        if key != gate.key or name != "SET" or gate.used:
            return await original(self, key, name, *args, **kw)
        gate.used = True
        gate.held.set()
        await gate.issue.wait()
        result = await original(self, key, name, *args, **kw)
        gate.landed.set()
        await gate.wake.wait()
        return result

    monkeypatch.setattr(RemoteTier, "_in_order", gated)
    yield gate
    gate.open()


def disk_spec(root: Path, budget: int) -> TierConfig:
    return TierConfig("disk", "disk", budget, path=str(root / "disk"), evictor="lru")


async def served_elsewhere(url: str, key: KeyLike) -> torch.Tensor | None:
    """What another store on the server (a restart, another instance) serves for ``key``."""
    config = StoreConfig((remote_spec(url, 64 * KIB),), promote_on_hit=False)
    async with TieredStore(config) as other:
        return await other.get(key)


async def wait_until_done(call: asyncio.Future[Any], timeout: float) -> None:
    await asyncio.wait([call], timeout=timeout)


async def check_no_old_value(url: str, call: asyncio.Future[Any], old: torch.Tensor) -> None:
    """Once ``call`` returned, no store on the server serves ``old`` (the value it replaced)."""
    if not call.done():
        return
    served = await served_elsewhere(url, MOVED)
    stale = served is not None and torch.equal(served, old)
    assert not stale, "the call returned while the stale move's value was on the server"


@pytest.mark.parametrize("landed_first", [False, True], ids=["before-set", "after-set-landed"])
@pytest.mark.parametrize("operation", ["delete", "overwrite"])
async def test_a_stale_move_into_redis_never_outlives_the_call_that_made_it_stale(
    tmp_path: Path,
    redis_server: RedisProcess,
    set_gate: SetGate,
    operation: str,
    landed_first: bool,
) -> None:
    """A disk -> redis move of ``k0`` is held inside its SET; a delete or an overwrite of
    ``k0`` (landing on disk) runs while the SET is held before it is issued, or after it
    landed.  Whenever the call has returned, the server holds no old value; the call returns
    once the gate opens (no deadlock: the move never waits for it)."""
    old = tensor_for(MOVED, numel=512)  # 2 KiB: evicted first, its room frees the overwrite's
    new = tensor_for(MOVED, version=1)
    config = StoreConfig(
        (disk_spec(tmp_path, 4 * KIB), remote_spec(redis_server.url, 64 * KIB)),
        room_timeout_s=ROOM_TIMEOUT_S,
        promote_on_hit=False,
    )
    async with TieredStore(config) as store:
        assert await store.put(MOVED, old) is PutStatus.LEGAL
        assert await store.put("k1", tensor_for("k1")) is PutStatus.LEGAL
        try:
            spill = asyncio.ensure_future(store.put("k2", tensor_for("k2", numel=512)))
            await asyncio.wait_for(set_gate.held.wait(), WAIT_S)  # the move of k0 to redis
            if landed_first:
                set_gate.issue.set()
                await asyncio.wait_for(set_gate.landed.wait(), WAIT_S)
            if operation == "delete":
                call = asyncio.ensure_future(store.delete(MOVED))
            else:
                call = asyncio.ensure_future(store.put(MOVED, new))
            await wait_until_done(call, SETTLE_S)
            await check_no_old_value(redis_server.url, call, old)
            set_gate.issue.set()
            await asyncio.wait_for(set_gate.landed.wait(), WAIT_S)
            await wait_until_done(call, SETTLE_S)
            await check_no_old_value(redis_server.url, call, old)
            set_gate.wake.set()
            result = await asyncio.wait_for(call, WAIT_S)
            await check_no_old_value(redis_server.url, call, old)
            assert await asyncio.wait_for(spill, WAIT_S) is PutStatus.LEGAL
        finally:
            set_gate.open()  # a failed check must not leave the store's close waiting
        got = await store.get(MOVED)
        if operation == "delete":
            assert result is True
            assert got is None
        else:
            assert result is PutStatus.LEGAL
            assert got is not None and torch.equal(got, new)
        assert store.audit() == []


async def committed(tier: RemoteTier, key: KeyLike) -> None:
    """Wait until ``tier`` indexes ``key`` (a commit wakes the tier's waiters)."""
    while tier.lookup(key) is None:
        await tier.changed()


@pytest.mark.parametrize("landed_first", [False, True], ids=["before-set", "after-set-landed"])
async def test_a_stale_move_into_redis_never_replaces_a_newer_put_there(
    tmp_path: Path, redis_server: RedisProcess, set_gate: SetGate, landed_first: bool
) -> None:
    """A disk -> redis move of ``k0`` is held at its SET (before it is issued, or after it
    landed) while a put of a new value of ``k0``, too large for the disk tier, lands on the
    server and commits.  Then the move goes on and learns it is stale: the server keeps the
    put's value, for this store and another one on the server alike."""
    old = tensor_for(MOVED, numel=512)  # 2 KiB: evicted first
    new = tensor_for(MOVED, version=1, numel=2048)  # 8 KiB: more than the disk tier holds
    config = StoreConfig(
        (disk_spec(tmp_path, 4 * KIB), remote_spec(redis_server.url, 64 * KIB)),
        room_timeout_s=ROOM_TIMEOUT_S,
        promote_on_hit=False,
    )
    async with TieredStore(config) as store:
        remote = store.tiers[1]
        assert isinstance(remote, RemoteTier)
        assert await store.put(MOVED, old) is PutStatus.LEGAL
        assert await store.put("k1", tensor_for("k1")) is PutStatus.LEGAL
        try:
            spill = asyncio.ensure_future(store.put("k2", tensor_for("k2", numel=512)))
            await asyncio.wait_for(set_gate.held.wait(), WAIT_S)  # the move of k0 to redis
            if landed_first:
                set_gate.issue.set()
                await asyncio.wait_for(set_gate.landed.wait(), WAIT_S)
            put = asyncio.ensure_future(store.put(MOVED, new))
            await asyncio.wait_for(committed(remote, MOVED), WAIT_S)  # its SET landed first
            set_gate.issue.set()
            await asyncio.wait_for(set_gate.landed.wait(), WAIT_S)
            set_gate.wake.set()
            assert await asyncio.wait_for(put, WAIT_S) is PutStatus.LEGAL
            assert await asyncio.wait_for(spill, WAIT_S) is PutStatus.LEGAL
        finally:
            set_gate.open()  # a failed check must not leave the store's close waiting
        await store.settle()
        got = await store.get(MOVED)
        assert got is not None and torch.equal(got, new), "the put's value is lost"
        served = await served_elsewhere(redis_server.url, MOVED)
        assert served is not None and torch.equal(served, new)
        assert store.audit() == []
