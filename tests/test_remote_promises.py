"""A redis tier keeps the store's promises: a delete wins over a demotion in flight, and a
dead server is skipped rather than the reason puts are refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import torch

from lmtier import PutStatus, StoreConfig, TierConfig, TieredStore
from lmtier.tiers.remote import RemoteTier

from conftest import tensor_for
from redis_helpers import RedisProcess, remote_spec
from store_helpers import ROOM_TIMEOUT_S

pytestmark = pytest.mark.redis

KIB = 1024


@pytest.fixture
async def raw(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_a_delete_wins_over_a_demotion_to_redis_in_flight(
    redis_server: RedisProcess, raw: aioredis.Redis
) -> None:
    """The demotion's SET lands while the delete runs: the delete returns only once the stale
    move removed what it wrote (held here), and no get finds the value meanwhile."""
    config = StoreConfig(
        (TierConfig("cpu", "memory", KIB), remote_spec(redis_server.url, 64 * KIB))
    )
    async with TieredStore(config) as store:
        remote = store.tiers[1]
        assert isinstance(remote, RemoteTier)
        name = remote.name_for("victim")
        set_gate, discard_gate = asyncio.Event(), asyncio.Event()
        command = remote._command

        async def gated_command(verb: str, *args: Any) -> Any:
            if verb == "SET" and args[0] == name:
                await set_gate.wait()
            return await command(verb, *args)

        discard = remote.discard
        discarding = asyncio.Event()

        async def gated_discard(obj: Any) -> None:
            discarding.set()
            await discard_gate.wait()
            await discard(obj)

        remote._command = gated_command  # type: ignore[method-assign]
        remote.discard = gated_discard  # type: ignore[method-assign]
        await store.put("victim", tensor_for("victim"))
        spill = asyncio.ensure_future(store.put("other", tensor_for("other")))
        while "victim" not in remote._writing:
            await asyncio.sleep(0.005)
        delete = asyncio.ensure_future(store.delete("victim"))
        await asyncio.sleep(0.05)
        set_gate.set()  # the stale move's SET lands now, after the delete began
        await asyncio.wait_for(discarding.wait(), 60)  # the move learnt it is stale
        assert await store.get("victim") is None
        assert not delete.done(), "the delete returned before the stale move's removal"
        discard_gate.set()
        assert await delete is True
        assert await raw.get(name) is None, "the delete returned with the value on the server"
        await spill
        assert await store.get("victim") is None
        assert await raw.get(name) is None
        assert store.audit() == []


async def test_a_dead_redis_tier_is_skipped_not_a_reason_to_refuse(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    """cpu -> disk -> redis with the server killed: bursts of puts all land above it."""
    config = StoreConfig(
        (
            TierConfig("cpu", "memory", 8 * KIB),
            TierConfig("disk", "disk", 32 * KIB, path=str(tmp_path)),
            remote_spec(redis_server.url, 1 << 20),
        ),
        room_timeout_s=ROOM_TIMEOUT_S,
    )
    async with TieredStore(config) as store:
        redis_server.kill()

        async def burst(task: int) -> list[PutStatus]:
            items = [(f"t{task}k{i}", tensor_for(f"t{task}k{i}", 0, 256)) for i in range(24)]
            return await store.put_many(items)

        results = await asyncio.gather(*(burst(task) for task in range(16)))
        statuses = [s for each in results for s in each]
        assert statuses.count(PutStatus.ILLEGAL) == 0
        tiers = store.stats()["tiers"]
        assert tiers["disk"]["entries"] > 0 and tiers["disk"]["drops"] > 0
        assert tiers["cpu"]["room_timeouts"] == tiers["disk"]["room_timeouts"] == 0
        for task in range(16):
            key = f"t{task}k23"
            got = await store.get(key)
            assert got is None or torch.equal(got, tensor_for(key, 0, 256))
        assert store.audit() == []


async def test_a_store_never_fetches_back_its_own_leftover_value(
    redis_server: RedisProcess, raw: aioredis.Redis
) -> None:
    """A value this store wrote but no longer indexes (a DEL that never reached the server, a
    stale move's write) is not served as another store's entry: it is deleted instead. A value
    another store wrote under the key is served."""
    config = StoreConfig((remote_spec(redis_server.url, 64 * KIB),))
    async with TieredStore(config) as store:
        remote = store.tiers[0]
        assert isinstance(remote, RemoteTier)
        await store.put("k", tensor_for("k", 1))
        remote.remove("k")  # forgotten by the index, its DEL lost
        assert await store.get("k") is None
        assert await raw.get(remote.name_for("k")) is None
        async with TieredStore(config) as other:  # another store writes the key
            await other.put("k", tensor_for("k", 2))
        got = await store.get("k")
        assert got is not None and torch.equal(got, tensor_for("k", 2))
        assert store.audit() == []


async def test_a_get_overlapping_a_put_to_redis_never_deletes_the_put(
    redis_server: RedisProcess, raw: aioredis.Redis
) -> None:
    """A get misses every index and asks the server; its GET is answered only after a put of
    the key has landed and committed: the value it finds is the put's, which stays."""
    config = StoreConfig((remote_spec(redis_server.url, 64 * KIB),))
    async with TieredStore(config) as store:
        remote = store.tiers[0]
        assert isinstance(remote, RemoteTier)
        name = remote.name_for("k")
        asked, answer = asyncio.Event(), asyncio.Event()
        command = remote._command

        async def gated_command(verb: str, *args: Any) -> Any:
            if verb == "GET" and args[0] == name:
                asked.set()
                await answer.wait()  # sent only once the put has landed
            return await command(verb, *args)

        remote._command = gated_command  # type: ignore[method-assign]
        get = asyncio.ensure_future(store.get("k"))
        await asyncio.wait_for(asked.wait(), ROOM_TIMEOUT_S)
        assert await store.put("k", tensor_for("k", 1)) is PutStatus.LEGAL
        answer.set()
        got = await asyncio.wait_for(get, ROOM_TIMEOUT_S)
        assert got is None or torch.equal(got, tensor_for("k", 1))
        assert await raw.get(name) is not None, "the get deleted the value the put wrote"
        got = await store.get("k")
        assert got is not None and torch.equal(got, tensor_for("k", 1))
        assert store.audit() == []


async def test_an_older_put_to_redis_never_replaces_a_newer_one(redis_server: RedisProcess) -> None:
    """Two puts of a key: the first's SET is held before it is issued until the second has
    landed, committed and returned.  The first then sends nothing: the server keeps the
    second's value (its SET would replace it, and its discard, the put being overtaken,
    would delete it)."""
    config = StoreConfig((remote_spec(redis_server.url, 64 * KIB),), room_timeout_s=ROOM_TIMEOUT_S)
    async with TieredStore(config) as store:
        remote = store.tiers[0]
        assert isinstance(remote, RemoteTier)
        held, release = asyncio.Event(), asyncio.Event()
        in_order = remote._in_order

        async def gated(key: Any, name: str, *args: Any, **kw: Any) -> Any:
            if key == "k" and name == "SET" and not held.is_set():
                held.set()
                await release.wait()
            return await in_order(key, name, *args, **kw)

        remote._in_order = gated  # type: ignore[method-assign]
        try:
            older = asyncio.ensure_future(store.put("k", tensor_for("k", 1)))
            await asyncio.wait_for(held.wait(), ROOM_TIMEOUT_S)
            assert await store.put("k", tensor_for("k", 2)) is PutStatus.LEGAL
        finally:
            release.set()
        assert await asyncio.wait_for(older, ROOM_TIMEOUT_S) is PutStatus.LEGAL
        await store.settle()
        got = await store.get("k")
        assert got is not None and torch.equal(got, tensor_for("k", 2)), "the newer put is lost"
        async with TieredStore(config) as other:
            got = await other.get("k")
            assert got is not None and torch.equal(got, tensor_for("k", 2))
        assert store.audit() == []
