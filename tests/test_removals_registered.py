"""Every removal of a key's older bytes is registered where the key's next put or delete
waits for it: an eviction past the bound on background removals, a move out of a disk tier,
an overwrite that lands in a memory tier.  A gate inside the disk tier's removal thread holds
the old file mid-unlink; a delete of the key must not return before it is gone."""

from __future__ import annotations

import ast
import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmtier import PutStatus
from lmtier.config import StoreConfig, TierConfig
from lmtier.store import MAX_DISCARDS_BEHIND, TieredStore
from lmtier.tiers import DiskTier
from lmtier.tiers import disk as disk_module
from lmtier.tiers.disk_files import scan_folder

from conftest import tensor_for
from redis_helpers import RedisProcess, remote_spec
from store_helpers import KIB, ROOM_TIMEOUT_S

# How long a delete that must wait is given to (wrongly) return: the buggy one returns at once.
SETTLE_S = 0.3
WAIT_S = 60.0


class FolderGate:
    """Holds every file removal under ``folder`` (in the removal thread) until released."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.release = threading.Event()
        self.held = 0  # removals that reached the gate


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FolderGate]:
    held = FolderGate(tmp_path / "held")
    original = disk_module._remove_file
    lock = threading.Lock()

    def gated(path: Path, fsync: bool) -> None:
        if held.folder in path.parents:
            with lock:
                held.held += 1
            assert held.release.wait(WAIT_S), "the test never released the removals"
        original(path, fsync)

    monkeypatch.setattr(disk_module, "_remove_file", gated)
    yield held
    held.release.set()  # a failing test must not leave the removal thread blocked


def disk_spec(name: str, folder: Path, budget: int) -> TierConfig:
    return TierConfig(name, "disk", budget, path=str(folder))


def files_of(tier: DiskTier) -> set[str]:
    return {str(entry.key) for entry in scan_folder(tier.root, tier.namespace).entries}


async def until(condition: object, what: str) -> None:
    """Wait (polling the loop) until ``condition()`` holds; a wide margin for a busy machine."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(0.005)


async def assert_deletes_wait(store: TieredStore, keys: list[str], gate: FolderGate) -> None:
    """Deletes of ``keys`` stay pending while their old files are held; they return once the
    gate opens, and the files are gone by then."""
    deletes = [asyncio.ensure_future(store.delete(key)) for key in keys]
    await asyncio.wait(deletes, timeout=SETTLE_S)
    returned = [key for key, delete in zip(keys, deletes, strict=True) if delete.done()]
    gate.release.set()
    await asyncio.wait_for(asyncio.gather(*deletes), WAIT_S)
    assert not returned, f"deletes returned with the old file still on disk: {returned}"


async def test_a_put_evicting_past_the_bound_registers_every_removal(
    tmp_path: Path, gate: FolderGate
) -> None:
    """One put evicts more than ``MAX_DISCARDS_BEHIND`` entries: the removals past the bound
    are awaited by the put, and a delete of any of those keys waits for them too."""
    count = MAX_DISCARDS_BEHIND + 8
    config = StoreConfig(
        (disk_spec("disk", gate.folder, count * KIB),), room_timeout_s=ROOM_TIMEOUT_S
    )
    keys = [f"k{i}" for i in range(count)]
    async with TieredStore(config) as store:
        disk = store.tiers[0]
        assert isinstance(disk, DiskTier)
        for key in keys:
            assert await store.put(key, tensor_for(key)) is PutStatus.LEGAL
        big = asyncio.ensure_future(store.put("big", tensor_for("big", numel=256 * count)))
        await until(lambda: not any(key in disk.cache_dict for key in keys), "all evicted")
        await until(lambda: gate.held >= 1, "a removal reached the gate")
        assert files_of(disk) >= set(keys), "the evicted files are held mid-unlink"
        await assert_deletes_wait(store, keys, gate)
        assert await asyncio.wait_for(big, WAIT_S) is PutStatus.LEGAL
        assert files_of(disk) == {"big"}
        assert store.audit() == []


async def test_a_move_from_disk_to_disk_registers_its_source_removal(
    tmp_path: Path, gate: FolderGate
) -> None:
    config = StoreConfig(
        (
            disk_spec("upper", gate.folder, 2 * KIB),
            disk_spec("lower", tmp_path / "lower", 8 * KIB),
        ),
        room_timeout_s=ROOM_TIMEOUT_S,
    )
    async with TieredStore(config) as store:
        upper, lower = store.tiers
        assert isinstance(upper, DiskTier) and isinstance(lower, DiskTier)
        for key in ("k0", "k1"):
            assert await store.put(key, tensor_for(key)) is PutStatus.LEGAL
        spill = asyncio.ensure_future(store.put("k2", tensor_for("k2")))  # moves k0 down
        await until(lambda: store.holder("k0") == "lower", "k0 moved down")
        await until(lambda: gate.held >= 1, "its source removal reached the gate")
        assert "k0" in files_of(upper)
        await assert_deletes_wait(store, ["k0"], gate)
        await asyncio.wait_for(spill, WAIT_S)
        assert "k0" not in files_of(upper) | files_of(lower)
        assert store.audit() == []


@pytest.mark.redis
async def test_a_move_from_disk_to_redis_registers_its_source_removal(
    tmp_path: Path, gate: FolderGate, redis_server: RedisProcess
) -> None:
    config = StoreConfig(
        (disk_spec("disk", gate.folder, 2 * KIB), remote_spec(redis_server.url, 64 * KIB)),
        room_timeout_s=ROOM_TIMEOUT_S,
    )
    async with TieredStore(config) as store:
        disk = store.tiers[0]
        assert isinstance(disk, DiskTier)
        for key in ("k0", "k1"):
            assert await store.put(key, tensor_for(key)) is PutStatus.LEGAL
        spill = asyncio.ensure_future(store.put("k2", tensor_for("k2")))
        await until(lambda: store.holder("k0") == "remote", "k0 moved to redis")
        await until(lambda: gate.held >= 1, "its source removal reached the gate")
        await assert_deletes_wait(store, ["k0"], gate)
        await asyncio.wait_for(spill, WAIT_S)
        assert "k0" not in files_of(disk)
        assert await store.get("k0") is None
        assert store.audit() == []


async def test_an_overwrite_landing_in_memory_registers_the_old_files_removal(
    tmp_path: Path, gate: FolderGate
) -> None:
    config = StoreConfig(
        (TierConfig("cpu", "memory", 2 * KIB), disk_spec("disk", gate.folder, 8 * KIB)),
        room_timeout_s=ROOM_TIMEOUT_S,
    )
    async with TieredStore(config) as store:
        disk = store.tiers[1]
        assert isinstance(disk, DiskTier)
        for key in ("k0", "k1", "k2"):
            assert await store.put(key, tensor_for(key)) is PutStatus.LEGAL
        assert store.holder("k0") == "disk"
        overwrite = asyncio.ensure_future(store.put("k0", tensor_for("k0", version=1)))
        await until(lambda: store.holder("k0") == "cpu", "the new value committed in memory")
        await until(lambda: gate.held >= 1, "the old file's removal reached the gate")
        await assert_deletes_wait(store, ["k0"], gate)
        assert await asyncio.wait_for(overwrite, WAIT_S) is PutStatus.LEGAL
        assert "k0" not in files_of(disk)
        assert await store.get("k0") is None
        assert store.audit() == []


def test_only_the_ledger_removes_stored_bytes() -> None:
    """A tier's ``discard`` (the removal of an entry's bytes) is called in the store package
    only by the ledger, which registers it for the key: no code path can forget to."""
    package = Path(__file__).resolve().parents[1] / "lmtier" / "store"
    callers = []
    for source in sorted(package.glob("*.py")):
        if source.name == "ledger.py":
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "discard"
                and not ast.unparse(node.func.value).endswith("ledger")
            ):
                callers.append(f"{source.name}:{node.lineno}: {ast.unparse(node)}")
    assert not callers, "removals outside the ledger:\n" + "\n".join(callers)
