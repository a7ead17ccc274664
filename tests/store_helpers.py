"""Small stores for tests: a CPU memory tier plays the GPU tier so the cascade runs anywhere."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
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


#: How long a crash test's child may take to report that it did its share of work: far beyond
#: what a loaded machine needs, so that only a child that hung or died reaches it.
REPORT_TIMEOUT_S = 120.0


def kill_after_report(target: Callable[..., None], args: tuple[object, ...]) -> None:
    """Run ``target(*args, report)`` in a forked child and SIGKILL it as soon as it reports.

    ``report`` is the write end of a pipe: the child writes a byte to it once it has done what
    the round needs, and goes on working; the kill then lands wherever the work is, however
    fast or slow the machine runs.
    """
    reader, writer = os.pipe()
    child = multiprocessing.get_context("fork").Process(target=target, args=(*args, writer))
    child.start()  # forked: no second torch import per round
    os.close(writer)
    try:
        ready, _, _ = select.select([reader], [], [], REPORT_TIMEOUT_S)
        reported = os.read(reader, 1) if ready else b""
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
    finally:
        os.close(reader)
    child.join(10)
    assert reported, "the child died or hung before it reported"
    assert child.exitcode == -signal.SIGKILL


def report_once(report: int) -> Callable[[], None]:
    """For a child of ``kill_after_report``: a function that reports, the first time only."""
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            os.write(report, b"!")

    return once


def count_waits(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The side-stream events the loop awaits (one per batch), recorded as they are awaited."""
    waits: list[object] = []
    real_wait = copies._wait_for

    async def counting(done: Any) -> None:
        waits.append(done)
        await real_wait(done)

    monkeypatch.setattr(copies, "_wait_for", counting)
    return waits
