"""The metrics of a redis tier: its availability gauge follows the server, killed or not."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import generate_latest

from lmtier import TieredStore
from lmtier.config import MetricsConfig, StoreConfig, TierConfig
from lmtier.monitoring import CATALOGUE

from metrics_helpers import exposed_names, scrape, value
from redis_helpers import RedisProcess, remote_spec
from store_helpers import ROOM_TIMEOUT_S

pytestmark = pytest.mark.redis

KIB = 1024


async def test_the_availability_gauge_goes_to_zero_when_the_server_dies(
    redis_server: RedisProcess,
) -> None:
    config = StoreConfig(
        (TierConfig("cpu", "memory", 2 * KIB), remote_spec(redis_server.url)),
        room_timeout_s=ROOM_TIMEOUT_S,
        metrics=MetricsConfig(port=0, host="127.0.0.1"),
    )
    async with TieredStore(config) as store:
        for number, key in enumerate("abcd"):  # the cpu tier holds two: a and b go to redis
            await store.put(key, torch.full((256,), float(number)))
        assert await store.contains("a") == "remote"
        samples, types = await asyncio.to_thread(scrape, store.metrics_port or 0)
        stats = store.stats()["tiers"]["remote"]
        assert value(samples, "lmtier_available", tier="remote") == 1
        assert frozenset({("tier", "cpu")}) not in samples["lmtier_available"]
        assert value(samples, "lmtier_round_trips_total", tier="remote") == stats["round_trips"]
        # with a redis tier, the store emits every metric there is
        assert exposed_names(types) == {spec.name for spec in CATALOGUE}

        redis_server.kill()
        assert await store.get("a") is None  # the read fails: the tier marks itself down
        samples, _ = await asyncio.to_thread(scrape, store.metrics_port or 0)
        assert store.stats()["tiers"]["remote"]["available"] is False
        assert value(samples, "lmtier_available", tier="remote") == 0
        assert (
            value(samples, "lmtier_errors_total", tier="remote")
            == (store.stats()["tiers"]["remote"]["errors"])
        )


async def test_a_get_served_from_another_stores_entry_is_a_timed_redis_load(
    redis_server: RedisProcess,
) -> None:
    def store(metrics: MetricsConfig | None) -> TieredStore:
        return TieredStore(StoreConfig((remote_spec(redis_server.url),), metrics=metrics))

    async with store(None) as writer, store(MetricsConfig()) as reader:  # unmonitored, monitored
        entry = torch.full((256,), 7.0)
        await writer.put("shared", entry)
        got = await writer.get("shared")  # its own entry: an untimed store observes nothing
        assert got is not None
        got = await reader.get("shared")  # not in its index: fetched from the server
        assert got is not None and torch.equal(got, entry)
        text = generate_latest(reader.metrics.registry).decode()
        stats = reader.stats()["tiers"]["remote"]
    assert stats["fetched"] == 1 and stats["bytes_out"] == entry.nbytes
    assert 'lmtier_load_duration_seconds_count{tier="remote"} 1.0' in text
    assert 'lmtier_get_size_bytes_sum{tier="remote"} 1024.0' in text
