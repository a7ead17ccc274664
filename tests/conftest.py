"""Shared fixtures; tests marked ``cuda`` are skipped where no CUDA device is present."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # contract suites are importable helpers

from redis_helpers import RedisProcess, need_redis


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def tensor_for(key: str, version: int = 0, numel: int = 256) -> torch.Tensor:
    """Content derived from the key and version, so a wrong or stale read is always visible."""
    seed = (sum(key.encode()) * 1_000_003 + version * 7_919) % 2**31
    return (torch.arange(numel, dtype=torch.int64) * 2_654_435_761 + seed).to(torch.int32)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A real redis-server on a free loopback port, killed after the test."""
    need_redis()
    process = RedisProcess(tmp_path / "redis").start()
    yield process
    process.kill()
