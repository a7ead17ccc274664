"""The store contract (lmtier.testing.store) over memory-only, cpu->disk and cpu->disk->redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtier import StoreConfig, TierConfig
from lmtier.testing import StoreContract

from redis_helpers import RedisProcess, remote_spec
from store_helpers import KIB, ROOM_TIMEOUT_S


class TestMemoryOnly(StoreContract):
    @pytest.fixture
    def store_config(self) -> StoreConfig:
        return StoreConfig((TierConfig("cpu", "memory", 16 * KIB),), room_timeout_s=ROOM_TIMEOUT_S)


class TestCpuOverDisk(StoreContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path) -> StoreConfig:
        return StoreConfig(
            (
                TierConfig("cpu", "memory", 16 * KIB),
                TierConfig("disk", "disk", 32 * KIB, path=str(tmp_path / "disk")),
            ),
            room_timeout_s=ROOM_TIMEOUT_S,
        )


@pytest.mark.redis
class TestCpuOverDiskOverRedis(StoreContract):
    @pytest.fixture
    def store_config(self, tmp_path: Path, redis_server: RedisProcess) -> StoreConfig:
        return StoreConfig(
            (
                TierConfig("cpu", "memory", 16 * KIB),
                TierConfig("disk", "disk", 32 * KIB, path=str(tmp_path / "disk")),
                remote_spec(redis_server.url, 64 * KIB),
            ),
            room_timeout_s=ROOM_TIMEOUT_S,
        )
