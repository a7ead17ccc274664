"""Small stores for tests: a CPU memory tier plays the GPU tier so the cascade runs anywhere."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lmtier import serde
from lmtier.config import StoreConfig, TierConfig
from lmtier.keys import KeyLike
from lmtier.store import TieredStore
from lmtier.tiers import copies

KIB = 1024
# How long a put may wait for room where the test expects it to find room: far beyond any
# healthy wait on a loaded machine, so that only a lost wake-up reaches it.
ROOM_TIMEOUT_S = 60.0


def cascade_config(
    root: Path,
    top: int = 4 * KIB,
    middle: int = 8 * KIB,
    disk: int = 16 * KIB,
    promote_on_hit: bool = True,
    room_timeout_s: float = ROOM_TIMEOUT_S,
) -> StoreConfig:
    return StoreConfig(
        tiers=(
            TierConfig("gpu", "memory", top),
            TierConfig("cpu", "memory", middle),
            TierConfig("disk", "disk", disk, path=str(root / "disk")),
        ),
        promote_on_hit=promote_on_hit,
        room_timeout_s=room_timeout_s,
    )


class DropLog:
    """Records the keys a store drops, in order."""

    def __init__(self) -> None:
        self.keys: list[KeyLike] = []

    def __call__(self, key: KeyLike) -> None:
        self.keys.append(key)


def make_store(root: Path, **kwargs: object) -> tuple[TieredStore, DropLog]:
    drops = DropLog()
    return TieredStore(cascade_config(root, **kwargs), on_drop=drops), drops  # type: ignore[arg-type]


def reshaped_entry(value: bytes, **changes: object) -> bytes:
    """An entry's bytes (a file's or a redis value's) with its header's fields (dtype, shape,
    key, ...) rewritten by ``changes``, its checksum and payload kept: what a stray writer or a
    bit-rotted header could leave."""
    header = serde.decode_header(value)
    fields = {
        "key": header.key,
        "dtype": header.dtype,
        "shape": header.shape,
        "nbytes": header.nbytes,
        "checksum": header.checksum,
        "namespace": header.namespace,
    }
    fields.update(changes)
    return serde.encode_header(**fields) + value[header.payload_offset :]  # type: ignore[arg-type]


def kill_midway(target: Callable[..., None], args: tuple[object, ...], delay: float) -> None:
    """Run ``target(*args)`` in a forked child and SIGKILL it after ``delay`` seconds."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()  # forked: no second torch import per round
    time.sleep(delay)
    assert child.pid is not None and child.is_alive(), "the child died on its own"
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.exitcode == -signal.SIGKILL


def count_waits(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The side-stream events the loop awaits (one per batch), recorded as they are awaited."""
    waits: list[object] = []
    real_wait = copies._wait_for

    async def counting(done: Any) -> None:
        waits.append(done)
        await real_wait(done)

    monkeypatch.setattr(copies, "_wait_for", counting)
    return waits
