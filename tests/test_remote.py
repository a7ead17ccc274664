"""The redis tier against real redis-server processes: contract, sharing, faults, cluster."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from lmtier import CacheEngineKey, PutStatus, StoreConfig, TierConfig, TieredStore, serde
from lmtier.testing.tier import TierContract, lru, store_in
from lmtier.tiers import Tier

from conftest import tensor_for
from redis_helpers import (
    REQUIRE_ENV,
    ROUND_TRIP_MARGIN_S,
    RedisProcess,
    free_port,
    need_redis,
    remote_spec,
    start_cluster,
)
from store_helpers import ROOM_TIMEOUT_S, reshaped_entry

try:
    import redis.asyncio as aioredis

    from lmtier.tiers.remote import RemoteTier
except ImportError:
    if os.environ.get(REQUIRE_ENV) == "1":
        raise
    pytest.skip("needs redis-py (pip install 'lmtier[redis]')", allow_module_level=True)

pytestmark = pytest.mark.redis

KIB = 1024
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(redis_server: RedisProcess) -> RedisProcess:
    return redis_server


def remote_store(url: str, budget: int = 1 << 20, cpu: int = 0, **fields: object) -> TieredStore:
    """A store whose last tier is remote; ``cpu`` > 0 puts a CPU tier of that many bytes above."""
    above = (TierConfig("cpu", "memory", cpu),) if cpu else ()
    return TieredStore(
        StoreConfig((*above, remote_spec(url, budget, **fields)), room_timeout_s=ROOM_TIMEOUT_S)
    )


def remote_of(store: TieredStore) -> RemoteTier:
    tier = store.tiers[-1]
    assert isinstance(tier, RemoteTier)
    return tier


@pytest.fixture
async def raw(server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()


class TestRedisTier(TierContract):
    @pytest.fixture(autouse=True)
    async def _server(self, server: RedisProcess) -> AsyncIterator[None]:
        self.server = server
        self.opened: list[RemoteTier] = []
        yield
        for tier in self.opened:
            await tier.close()

    async def make_tier(self, budget: int) -> Tier:
        tier = RemoteTier("remote", lru(budget), self.server.url, key_prefix=uuid.uuid4().hex)
        await tier.open()
        self.opened.append(tier)
        return tier


async def test_values_are_self_describing_and_named_by_a_hash(
    server: RedisProcess, raw: aioredis.Redis
) -> None:
    key = CacheEngineKey("vllm", "llama/3", 2, 1, "c0ffee")
    tensor = torch.randn(4, 16).to(torch.bfloat16)
    async with remote_store(server.url) as store:
        await store.put(key, tensor)
        name = remote_of(store).name_for(key)
    assert "llama" not in name and name.startswith(remote_of(store).key_prefix)
    value = await raw.get(name)
    header = serde.decode_header(value)
    assert (header.key, header.dtype, header.shape) == (key, torch.bfloat16, (4, 16))
    assert len(value) == header.file_size


async def _flip_last_byte(raw: aioredis.Redis, name: str) -> None:
    value = await raw.get(name)
    await raw.set(name, value[:-1] + bytes([value[-1] ^ 0xFF]))


async def _truncate(raw: aioredis.Redis, name: str) -> None:
    await raw.set(name, (await raw.get(name))[:-3])


async def _garbage(raw: aioredis.Redis, name: str) -> None:
    await raw.set(name, b"not an lmtier entry at all")


@pytest.mark.parametrize("damage", [_flip_last_byte, _truncate, _garbage])
@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "fetched"])
async def test_a_damaged_value_is_a_counted_miss(
    server: RedisProcess, raw: aioredis.Redis, damage: object, indexed: bool
) -> None:
    async with remote_store(server.url) as writer:
        await writer.put("k", tensor_for("k", numel=4096))
        await damage(raw, remote_of(writer).name_for("k"))  # type: ignore[operator]
        reader = writer if indexed else remote_store(server.url)
        async with reader:
            assert await reader.get("k") is None
            tier = remote_of(reader)
            assert tier.counters.corrupt == 1 and len(tier.cache_dict) == 0
            assert reader.audit() == []


async def test_another_namespace_is_never_read(server: RedisProcess) -> None:
    specs = [remote_spec(server.url, key_prefix="same")]
    async with TieredStore(StoreConfig(tuple(specs), namespace="a")) as a:
        await a.put("k", tensor_for("k"))
        async with TieredStore(StoreConfig(tuple(specs), namespace="b")) as b:
            assert await b.get("k") is None and remote_of(b).counters.corrupt == 1
    async with remote_store(server.url) as default_prefix:  # namespaces have their own prefix
        assert await default_prefix.get("k") is None
        assert remote_of(default_prefix).counters.corrupt == 0


CHILD = """
import asyncio, sys
import torch
from lmtier import CacheEngineKey, PutStatus, StoreConfig, TierConfig, TieredStore

async def main(url: str, key: str) -> None:
    # Timeouts a loaded machine keeps: the defaults (2 s) are for a production server.
    remote = TierConfig("remote", "redis", 1 << 20, url=url, connect_timeout_s=10, op_timeout_s=10)
    config = StoreConfig((remote,), namespace="m")
    async with TieredStore(config) as store:
        value = torch.arange(3000, dtype=torch.int32) * 7 + 3
        status = await store.put(CacheEngineKey.from_string(key), value.view(30, 100))
        assert status is PutStatus.LEGAL, status

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_put_in_another_process_is_a_hit_here(server: RedisProcess) -> None:
    key = CacheEngineKey("vllm", "llama", 1, 0, "beef")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-c", CHILD, server.url, key.to_string()],
        cwd=REPO, env=env, check=True, timeout=120,
    )  # fmt: skip
    expected = (torch.arange(3000, dtype=torch.int32) * 7 + 3).view(30, 100)
    tiers = (TierConfig("cpu", "memory", 64 * KIB), remote_spec(server.url))
    async with TieredStore(StoreConfig(tiers, namespace="m")) as store:
        got = await store.get(key)
        assert got is not None and torch.equal(got, expected)
        assert remote_of(store).counters.fetched == 1
        assert await store.contains(key) == "cpu", "an adopted hit is promoted like any other"
        assert store.audit() == []
        # The promotion left the server's copy for the other instances.
        async with TieredStore(StoreConfig((remote_spec(server.url),), namespace="m")) as third:
            got = await third.get(key)
            assert got is not None and torch.equal(got, expected)


async def test_entries_gone_behind_the_index_are_discharged_when_read(
    server: RedisProcess, raw: aioredis.Redis
) -> None:
    async with (
        remote_store(server.url, budget=64 * KIB) as store,
        remote_store(server.url) as other,
    ):
        tier = remote_of(store)
        for key in "abcdefgh":
            await store.put(key, tensor_for(key))
        await raw.delete(tier.name_for("a"), tier.name_for("b"))  # another instance deletes
        assert await other.delete("c")  # ... through its own store, without indexing it
        await other.put("d", tensor_for("d", version=1))  # ... or replaces an entry
        got = {key: await store.get(key) for key in "abcdefgh"}
        assert [k for k, v in got.items() if v is None] == ["a", "b", "c", "d"]
        assert all(torch.equal(got[k], tensor_for(k)) for k in "efgh")  # type: ignore[arg-type]
        assert len(tier.cache_dict) == 4
        assert tier.resident_bytes == tier.evictor.charged_bytes == 4 * KIB
        assert store.audit() == [] and other.audit() == []
        assert await raw.exists(tier.name_for("d")), "another store's value is not ours to delete"
        got_d = await store.get("d")  # and the next get finds the newer value
        assert got_d is not None and torch.equal(got_d, tensor_for("d", version=1))


async def test_server_evictions_under_maxmemory_never_break_accounting(tmp_path: Path) -> None:
    need_redis()
    server = RedisProcess(tmp_path, None, "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    server.start()
    try:
        async with remote_store(server.url, budget=64 << 20) as store:
            keys = [f"k{i}" for i in range(40)]
            for key in keys:  # 5 MiB into a server that keeps 2
                assert await store.put(key, tensor_for(key, numel=32 * KIB)) is PutStatus.LEGAL
            got = await store.get_many(keys)
            hits = [k for k, v in zip(keys, got, strict=True) if v is not None]
            assert 0 < len(hits) < len(keys)
            assert all(torch.equal(v, tensor_for(k, numel=32 * KIB)) for k, v in zip(keys, got, strict=True) if v is not None)  # fmt: skip  # noqa: E501
            tier = remote_of(store)
            assert sorted(tier.cache_dict) == sorted(hits)
            assert tier.evictor.charged_bytes == len(hits) * 128 * KIB == tier.resident_bytes
            assert store.audit() == []
    finally:
        server.kill()


async def test_a_full_noeviction_server_refuses_writes_and_the_store_serves_on(
    tmp_path: Path,
) -> None:
    need_redis()
    server = RedisProcess(tmp_path, None, "--maxmemory", "1mb", "--maxmemory-policy", "noeviction")
    server.start()
    try:
        async with remote_store(server.url, budget=64 << 20, cpu=128 * KIB) as store:
            for i in range(40):
                status = await store.put(f"k{i}", tensor_for(f"k{i}", numel=16 * KIB))
                assert status is PutStatus.LEGAL
            tier = remote_of(store)
            assert tier.counters.errors > 0 and store.tiers[0].counters.drops > 0
            assert tier.available, "a refused write is not an outage"
            got = await store.get("k39")
            assert got is not None and torch.equal(got, tensor_for("k39", numel=16 * KIB))
            assert store.audit() == []
    finally:
        server.kill()


async def test_put_many_and_get_many_cost_one_round_trip(
    server: RedisProcess, raw: aioredis.Redis
) -> None:
    items = [(f"chunk{i}", tensor_for(f"chunk{i}", numel=16 * KIB)) for i in range(8)]
    async with remote_store(server.url, budget=1 << 20) as store:
        tier = remote_of(store)
        before = tier.round_trips
        assert await store.put_many(items) == [PutStatus.LEGAL] * 8
        assert tier.round_trips - before == 1
        # The tier's timeout bounds a round trip; a socket timeout would add a task to each send.
        pool = tier._client.connection_pool  # type: ignore[union-attr]
        assert [c.socket_timeout for c in pool._available_connections] == [None]
        stats = await raw.info("commandstats")
        assert stats["cmdstat_set"]["calls"] == 8
        before = tier.round_trips
        got = await store.get_many([key for key, _ in items])
        assert tier.round_trips - before == 1
        assert all(torch.equal(g, t) for g, (_, t) in zip(got, items, strict=True))  # type: ignore[arg-type]
    async with remote_store(server.url) as fresh:  # keys it never indexed: one round trip too
        got = await fresh.get_many([key for key, _ in items])
        assert remote_of(fresh).round_trips == 1  # one GET batch (its connecting PING aside)
        assert all(g is not None for g in got) and fresh.audit() == []


# ---------------------------------------------------------------------- faults
# An operation against a server that is down or stopped is bounded by the tier's timeouts:
# it ends well within this, however loaded the machine, where an unbounded one never ends.
BOUNDED_S = 3 * ROUND_TRIP_MARGIN_S


def assert_bounded(started: float) -> None:
    """The operation begun at ``started`` ended: it did not wait on the server for ever."""
    assert time.monotonic() - started < BOUNDED_S


async def wait_available(tier: RemoteTier, store: TieredStore, key: str) -> None:
    deadline = time.monotonic() + BOUNDED_S
    while not tier.available:
        assert time.monotonic() < deadline, "the tier never reconnected"
        await store.get(key)  # an operation after the backoff probes the server
        await asyncio.sleep(0.05)


async def test_server_down_at_start_then_up(tmp_path: Path) -> None:
    need_redis()
    port = free_port()
    store = remote_store(f"redis://127.0.0.1:{port}", cpu=2 * KIB)
    started = time.monotonic()
    async with store:
        assert_bounded(started)
        tier = remote_of(store)
        assert not tier.available
        for key in "abcd":
            started = time.monotonic()
            assert await store.put(key, tensor_for(key)) is PutStatus.LEGAL
            assert_bounded(started)
        assert store.tiers[0].counters.drops == 2 and tier.counters.unavailable > 0
        assert store.audit() == []
        server = RedisProcess(tmp_path, port).start()
        try:
            await wait_available(tier, store, "nothing")
            for key in "efgh":
                await store.put(key, tensor_for(key))
            assert sorted(tier.cache_dict) == list("cdef")  # a and b went while it was down
            got = await store.get("e")
            assert got is not None and torch.equal(got, tensor_for("e"))
            assert store.audit() == []
        finally:
            server.kill()


async def filled(store: TieredStore) -> RemoteTier:
    """Six puts through a CPU tier of two entries: the remote tier holds a to d."""
    tier = remote_of(store)
    for key in "abcdef":
        await store.put(key, tensor_for(key))
    assert sorted(tier.cache_dict) == list("abcd")
    return tier


async def test_server_killed_mid_run_and_restarted(server: RedisProcess) -> None:
    async with remote_store(server.url, cpu=2 * KIB) as store:
        tier = await filled(store)
        server.kill()
        started = time.monotonic()
        assert await store.get("a") is None
        assert_bounded(started)
        for key in "gh":  # puts keep landing in the CPU tier; its victims are dropped
            started = time.monotonic()
            assert await store.put(key, tensor_for(key)) is PutStatus.LEGAL
            assert_bounded(started)
        got = await store.get("h")
        assert got is not None and torch.equal(got, tensor_for("h"))
        assert not tier.available and tier.counters.errors >= 1 and store.audit() == []
        server.start()  # the same port, empty: the old entries are gone
        await wait_available(tier, store, "b")
        assert await store.get("c") is None  # indexed, gone with the restart: discharged
        for key in "ijkl":
            await store.put(key, tensor_for(key))
        got = await store.get("i")
        assert got is not None and torch.equal(got, tensor_for("i"))
        assert tier.resident_bytes == tier.evictor.charged_bytes == KIB * len(tier.cache_dict)
        assert store.audit() == []


async def test_a_stopped_server_times_out_and_recovers(server: RedisProcess) -> None:
    async with remote_store(server.url, cpu=2 * KIB) as store:
        tier = await filled(store)
        # Short timeouts while the server is stopped only: there they are what is tested.
        tier.connect_timeout_s = tier.op_timeout_s = 0.5
        server.pause()
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(store.get(key) for key in "ab"))
            assert_bounded(started)
            assert results == [None, None] and not tier.available
            started = time.monotonic()
            assert await store.get("c") is None  # fails at once, or after one probe
            assert_bounded(started)
            assert store.audit() == []
        finally:
            server.resume()
            tier.connect_timeout_s = tier.op_timeout_s = ROUND_TRIP_MARGIN_S
        await wait_available(tier, store, "nothing")
        # A server down is no evidence against an entry: it stayed indexed, and is served again.
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("a"))
        assert tier.counters.fetched == 0 and store.audit() == []


# ---------------------------------------------------------------------- cluster
async def test_a_three_master_cluster_spreads_and_serves_entries(tmp_path: Path) -> None:
    need_redis()
    nodes = start_cluster(tmp_path)
    try:
        items = [(f"chunk{i}", tensor_for(f"chunk{i}", numel=4 * KIB)) for i in range(30)]
        async with remote_store(nodes[0].url, cluster=True) as store:
            assert remote_of(store).available
            before = remote_of(store).round_trips
            assert await store.put_many(items) == [PutStatus.LEGAL] * 30
            assert remote_of(store).round_trips - before == 1
            sizes = [int(node.cli("dbsize")) for node in nodes]
            assert sum(sizes) == 30 and min(sizes) > 0, sizes
            assert await store.delete("chunk0")
        async with remote_store(nodes[1].url, cluster=True) as other:
            got = await other.get_many([key for key, _ in items])
            assert got[0] is None
            assert all(torch.equal(g, t) for g, (_, t) in zip(got[1:], items[1:], strict=True))  # type: ignore[arg-type]
            assert len(remote_of(other).cache_dict) == 29 and other.audit() == []
    finally:
        for node in nodes:
            node.kill()


def serves(node: RedisProcess, name: str) -> bool:
    """Whether ``node`` is the master of ``name``'s hash slot."""
    slot = int(node.cli("cluster", "keyslot", name))
    mine = next(line for line in node.cli("cluster", "nodes").splitlines() if "myself" in line)
    for ranges in mine.split()[8:]:
        low, _, high = ranges.partition("-")
        if int(low) <= slot <= int(high or low):
            return True
    return False


def all_none_or_equal(got: list[torch.Tensor | None], expected: list[torch.Tensor]) -> bool:
    return all(g is None or torch.equal(g, e) for g, e in zip(got, expected, strict=True))


async def test_a_cluster_master_killed_mid_run_and_restarted(tmp_path: Path) -> None:
    need_redis()
    nodes = start_cluster(tmp_path)
    try:
        items = [(f"chunk{i}", tensor_for(f"chunk{i}", numel=KIB)) for i in range(30)]
        keys = [key for key, _ in items]
        async with remote_store(nodes[0].url, cluster=True) as store:
            tier = remote_of(store)
            assert await store.put_many(items) == [PutStatus.LEGAL] * 30
            lost = int(nodes[2].cli("dbsize"))
            assert lost > 0
            new = next(f"new{i}" for i in range(1000) if serves(nodes[2], tier.name_for(f"new{i}")))
            nodes[2].kill()
            for _ in range(3):  # before and after the others mark it failed (2 s node timeout)
                started = time.monotonic()
                got = await store.get_many(keys)
                assert_bounded(started)  # a probe, then one round trip
                assert all_none_or_equal(got, [t for _, t in items])
                started = time.monotonic()
                assert await store.put(new, tensor_for(new)) is PutStatus.ILLEGAL
                assert_bounded(started)
                assert store.audit() == []
                await asyncio.sleep(1)
            assert tier.counters.errors + tier.counters.unavailable > 0
            nodes[2].start()  # same port and cluster config: it rejoins with its slots, empty
            deadline = time.monotonic() + 20
            while not all("cluster_state:ok" in node.cli("cluster", "info") for node in nodes):
                assert time.monotonic() < deadline, "the cluster did not recover"
                await asyncio.sleep(0.1)
            deadline = time.monotonic() + 10
            while await store.put(new, tensor_for(new)) is not PutStatus.LEGAL:
                assert time.monotonic() < deadline, "the tier never served again"
                await asyncio.sleep(0.1)
            got = await store.get_many(keys)
            assert sum(g is None for g in got) == lost  # the restarted master's went with it
            assert all_none_or_equal(got, [t for _, t in items])
            assert tier.resident_bytes == tier.evictor.charged_bytes
            assert store.audit() == []
    finally:
        for node in nodes:
            node.kill()


async def test_a_delete_removes_the_shared_copy(server: RedisProcess) -> None:
    async with remote_store(server.url) as a, remote_store(server.url) as b:
        await a.put("k", tensor_for("k"))
        await a.put("j", tensor_for("j"))
        assert await b.get("k") is not None  # b indexes it now
        assert await b.delete("k") and await b.delete("j")  # j: b never indexed it
        assert await a.get("k") is None and await a.get("j") is None
        assert await b.delete("k") is False
        assert a.audit() == [] and b.audit() == []


async def test_store_in_keeps_working_through_the_contract_helper(server: RedisProcess) -> None:
    tier = RemoteTier("remote", lru(4 * KIB), server.url)
    await tier.open()
    try:
        await store_in(tier, "x", tensor_for("x"))
        assert tier.stats()["round_trips"] >= 1 and tier.stats()["available"] is True
    finally:
        await tier.close()


async def test_a_put_replacing_a_promoted_key_removes_the_copy_left_on_the_server(
    server: RedisProcess, raw: aioredis.Redis
) -> None:
    async with remote_store(server.url) as other, remote_store(server.url, cpu=64 * KIB) as store:
        await other.put("k", tensor_for("k"))
        name = remote_of(store).name_for("k")
        got = await store.get("k")
        assert got is not None and await store.contains("k") == "cpu"
        assert await raw.exists(name), "a promotion leaves the value for the other instances"
        await store.put("k", tensor_for("k", version=1))
        assert not await raw.exists(name), "the older value would be found again"
        got = await store.get("k")
        assert got is not None and torch.equal(got, tensor_for("k", version=1))
        assert await other.get("k") is None  # its entry vanished: discharged, not served
        assert store.audit() == [] and other.audit() == []


async def test_the_stress_run_keeps_every_invariant_through_a_redis_tier(
    server: RedisProcess, tmp_path: Path
) -> None:
    from lmtier.cli.stress.run import StressOptions, run_stress

    tiers = (
        TierConfig("cpu", "memory", 64 * KIB),
        TierConfig("disk", "disk", 128 * KIB, path=str(tmp_path / "disk")),
        remote_spec(server.url, budget=256 * KIB),
    )
    async with TieredStore(StoreConfig(tiers)) as store:
        report = await run_stress(store, StressOptions(tasks=8, ops=200, keys_per_task=16))
        assert report.problems == [] and store.audit() == []
        assert remote_of(store).counters.demotions_in > 0


@pytest.mark.parametrize(
    "changes",
    [{"shape": (64, 64)}, {"dtype": torch.float32}, {"shape": (-64, -64)}, {"shape": (4096,)}],
    ids=repr,
)
@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "fetched"])
async def test_a_value_rewritten_by_another_client_is_a_counted_miss(
    server: RedisProcess, raw: aioredis.Redis, changes: dict[str, object], indexed: bool
) -> None:
    async with remote_store(server.url) as writer:
        await writer.put("k", tensor_for("k", numel=4096).reshape(32, 128))
        name = remote_of(writer).name_for("k")
        await raw.set(name, reshaped_entry(await raw.get(name), **changes))
        reader = writer if indexed else remote_store(server.url)
        async with reader:
            got = await reader.get("k")
            assert got is None, f"served {got.dtype}{list(got.shape)} from a crafted value"
            tier = remote_of(reader)
            assert tier.counters.corrupt == 1 and len(tier.cache_dict) == 0
            assert reader.audit() == []


async def test_a_str_key_and_an_engine_key_of_the_same_text_are_two_keys_on_redis(
    server: RedisProcess,
) -> None:
    text, engine = "f@m@1@0@h", CacheEngineKey("f", "m", 1, 0, "h")
    async with remote_store(server.url) as store:
        assert remote_of(store).name_for(text) != remote_of(store).name_for(engine)
        await store.put(text, tensor_for("text"))
        await store.put(engine, tensor_for("engine"))
        async with remote_store(server.url) as other:  # reads the server, not an index
            for key, name in ((text, "text"), (engine, "engine")):
                got = await other.get(key)
                assert got is not None and torch.equal(got, tensor_for(name))
            assert remote_of(other).counters.corrupt == 0


async def test_a_value_holding_another_kind_of_key_is_a_miss(
    server: RedisProcess, raw: aioredis.Redis
) -> None:
    text, engine = "f@m@1@0@h", CacheEngineKey("f", "m", 1, 0, "h")
    async with remote_store(server.url) as store:
        await store.put(engine, tensor_for("engine"))
        tier = remote_of(store)
        await raw.set(tier.name_for(text), await raw.get(tier.name_for(engine)))
        async with remote_store(server.url) as other:
            assert await other.get(text) is None
            assert remote_of(other).counters.corrupt == 1


async def test_a_negative_view_keeps_its_sign_on_redis(server: RedisProcess) -> None:
    values = {
        "neg": torch._neg_view(torch.arange(1.0, 65.0)),
        "conj": torch.tensor([1 + 2j]).conj().imag,  # one element, its negative bit set
    }
    async with remote_store(server.url) as store:
        for key, value in values.items():
            await store.put(key, value)
        async with remote_store(server.url) as other:
            for key, value in values.items():
                got = await other.get(key)
                assert got is not None and got.tolist() == value.tolist(), key
