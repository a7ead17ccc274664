"""The metrics of a redis tier: its availability gauge follows the server, killed or not."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lmtier import TieredStore
from lmtier.config import MetricsConfig, StoreConfig, TierConfig
from lmtier.monitoring import CATALOGUE

from metrics_helpers import exposed_names, scrape, value
from redis_helpers import RedisProcess, remote_spec

pytestmark = pytest.mark.redis

KIB = 1024


async def test_the_availability_gauge_goes_to_zero_when_the_server_dies(
    redis_server: RedisProcess,
) -> None:
    config = StoreConfig(
        (TierConfig("cpu", "memory", 2 * KIB), remote_spec(redis_server.url)),
        room_timeout_s=2,
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
