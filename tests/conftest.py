"""Shared fixtures; tests marked ``cuda`` are skipped where no CUDA device is present."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers (store_helpers, ...) import by name

from lmtier.testing.values import tensor_for as tensor_for  # the tests import it from here

from redis_helpers import RedisProcess, need_redis


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A real redis-server on a free loopback port, killed after the test."""
    need_redis()
    process = RedisProcess(tmp_path / "redis").start()
    yield process
    process.kill()
