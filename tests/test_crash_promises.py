"""A store killed (SIGKILL) at random moments while tasks overwrite, delete and spill keys:
after each restart, no put or delete that had returned is undone.

Each scenario drives a cascade through one kind of removal of a key's older bytes: evictions
from disk (one put evicting more than ``MAX_DISCARDS_BEHIND`` entries), moves out of a disk
tier (into another disk tier, or onto a redis server, whose value is there before the move
commits), overwrites that land in memory while the old value is on disk.  The child slows
every unlink (a slow disk) and every DEL on the server, so a call that returned before its
key's old file or value was gone is caught by the restart.  It reports over a pipe once it has
done a round's share of calls and is killed right then, wherever its work is."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import StoreConfig, TierConfig, TieredStore
from lmtier.keys import KeyLike
from lmtier.store import MAX_DISCARDS_BEHIND
from lmtier.tiers import disk as disk_module
from lmtier.tiers.remote import RemoteTier

from redis_helpers import RedisProcess, remote_spec
from store_helpers import kill_after_report, report_once

KIB = 1024
# CI's slow run sets LMTIER_CRASH_ROUNDS=30; a plain run kills fewer times.
ROUNDS = int(os.environ.get("LMTIER_CRASH_ROUNDS", "6"))
# Each unlink of the child takes this long more: the window a removal nobody waits for opens.
SLOW_UNLINK_S = 0.003
# One put of this many KiB evicts more entries of 1 KiB than are removed in the background.
BURST_KIB = MAX_DISCARDS_BEHIND + 12


def content(key: str, version: int, kib: int | None = None) -> torch.Tensor:
    """1-4 KiB by version, or ``kib``; derived from key and version."""
    numel = 256 * (kib or 1 + version % 4)
    seed = (sum(key.encode()) * 7919 + version * 104_729) % 2**31
    return (torch.arange(numel, dtype=torch.int64) * 40503 + seed).to(torch.int32)


@dataclass(frozen=True)
class Scenario:
    """A cascade and a workload: ``tasks`` tasks over ``keys`` keys (shared by all tasks, or
    ``keys`` per task); ``burst``: one more task puts and deletes a key of ``BURST_KIB``."""

    tiers: Callable[[Path, str], tuple[TierConfig, ...]]
    persistent: Callable[[Path, str], tuple[TierConfig, ...]]  # what a restart finds
    tasks: int = 8
    keys: int = 2
    shared: bool = False
    burst: bool = False
    small_kib: int | None = None  # fixed entry size, else 1-4 KiB by version
    write_ahead: bool = False


def disk(root: Path, name: str, kib: int) -> TierConfig:
    return TierConfig(name, "disk", kib * KIB, path=str(root / name))


def cpu_disk(root: Path, _url: str) -> tuple[TierConfig, ...]:
    return TierConfig("cpu", "memory", 4 * KIB), disk(root, "disk", 48)


def disk_redis(root: Path, url: str) -> tuple[TierConfig, ...]:
    # Room for a put beside a move out: the put need not wait for the move to free its bytes.
    return disk(root, "disk", 12), remote_spec(url, 48 * KIB)


def cpu_disk_redis(root: Path, url: str) -> tuple[TierConfig, ...]:
    return TierConfig("cpu", "memory", 4 * KIB), *disk_redis(root, url)


SCENARIOS = {
    "cpu-disk": Scenario(cpu_disk, lambda root, _: (disk(root, "disk", 48),)),
    "write-ahead": Scenario(cpu_disk, lambda root, _: (disk(root, "disk", 48),), write_ahead=True),
    "disk-burst": Scenario(
        lambda root, _: (disk(root, "disk", BURST_KIB + 4),),
        # Room for every file left: an evicted file that a delete had to see gone is found.
        lambda root, _: (disk(root, "disk", 4 * BURST_KIB),),
        tasks=4,
        keys=BURST_KIB,
        shared=True,
        burst=True,
        small_kib=1,
    ),
    "disk-to-disk": Scenario(
        lambda root, _: (disk(root, "upper", 6), disk(root, "lower", 48)),
        lambda root, _: (disk(root, "upper", 6), disk(root, "lower", 48)),
        keys=12,
        shared=True,
    ),
    "overwrite-in-memory": Scenario(
        lambda root, _: (TierConfig("cpu", "memory", 6 * KIB), disk(root, "disk", 48)),
        lambda root, _: (disk(root, "disk", 48),),
        keys=12,
        shared=True,
    ),
    # The server outlives the child: a stale move's SET left there is what a restart finds.
    "disk-to-redis": Scenario(disk_redis, disk_redis, keys=12, shared=True),
    "cpu-disk-redis": Scenario(cpu_disk_redis, disk_redis, keys=12, shared=True),
}
REDIS_SCENARIOS = ["disk-to-redis", "cpu-disk-redis"]


def slow_unlinks() -> None:
    """In the child: every file removal waits a little first, as on a slow disk."""
    remove = disk_module._remove_file

    def slow(path: Path, fsync: bool) -> None:
        time.sleep(SLOW_UNLINK_S)
        remove(path, fsync)

    disk_module._remove_file = slow


def slow_redis_deletes() -> None:
    """In the child: every DEL on the server waits a little first, as on a slow server."""
    command = RemoteTier._command

    async def slow(self: RemoteTier, name: str, *args: Any) -> Any:
        if name == "DEL":
            await asyncio.sleep(SLOW_UNLINK_S)
        return await command(self, name, *args)

    RemoteTier._command = slow  # type: ignore[method-assign]


def worker(root: Path, url: str, seed: int, name: str, calls: int, report: int) -> None:
    """Tasks overwrite and delete keys (their demotions race each other's puts); every call is
    logged before it starts and after it returns, and every drop.  Reports once ``calls``
    calls have returned."""
    torch.set_num_threads(1)
    slow_unlinks()
    slow_redis_deletes()
    scenario = SCENARIOS[name]
    log_fd = os.open(root / f"ops-{seed}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    reported = report_once(report)
    returned = 0

    def note(line: str) -> None:
        os.write(log_fd, (line + "\n").encode())  # one write: whole lines even when killed

    def on_drop(key: KeyLike) -> None:
        note(f"D {key}")

    async def call(store: TieredStore, ident: str, key: str, version: int | None) -> None:
        nonlocal returned
        if version is None:
            note(f"S {ident} del {key} -1")
            await store.delete(key)
        else:
            note(f"S {ident} put {key} {version}")
            kib = BURST_KIB if key == "big" else scenario.small_kib
            await store.put(key, content(key, version, kib))
        note(f"E {ident} {key}")
        returned += 1
        if returned >= calls:
            reported()

    async def task(store: TieredStore, index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        version = seed * 1_000_000 + index * 10_000  # unique across rounds and tasks
        for step in range(1_000_000):
            owner = "" if scenario.shared else f"t{index}"
            key = f"{owner}k{rng.randrange(scenario.keys)}"
            version += 1
            await call(store, f"{index}.{step}", key, None if rng.random() < 0.3 else version)

    async def bursts(store: TieredStore) -> None:
        version = seed * 1_000_000 + 999_000
        for step in range(1_000_000):
            version += 1
            await call(store, f"b.{step}", "big", None if step % 2 else version)

    async def run() -> None:
        config = StoreConfig(scenario.tiers(root, url), write_ahead=scenario.write_ahead)
        async with TieredStore(config, on_drop=on_drop) as store:
            work = [task(store, index) for index in range(scenario.tasks)]
            await asyncio.gather(*work, *([bursts(store)] if scenario.burst else []))

    asyncio.run(run())


@dataclass
class Call:
    value: int | None  # the version a put stores, None for a delete
    started: int  # the log line it started at
    ended: int | None = None


@dataclass
class KeyHistory:
    """What the logs say of one key: the values a restart may serve (None: absent)."""

    possible: set[int | None] = field(default_factory=lambda: {None})
    calls: dict[str, Call] = field(default_factory=dict)  # this round's

    def in_flight(self) -> Iterator[Call]:
        return (c for c in self.calls.values() if c.ended is None)


def read_logs(root: Path, rounds: int) -> dict[str, KeyHistory]:
    """Replay the logs of every round so far.  When a call returns, the key holds its value
    or that of a call that overlapped it (which may have taken effect after it); a call in
    flight when its process was killed may or may not have happened."""
    keys: dict[str, KeyHistory] = defaultdict(KeyHistory)
    for seed in range(rounds):
        for line_no, line in enumerate((root / f"ops-{seed}.log").read_text().splitlines()):
            parts = line.split()
            if parts[0] == "S" and len(parts) == 5:
                value = int(parts[4]) if parts[2] == "put" else None
                keys[parts[3]].calls[parts[1]] = Call(value, line_no)
            elif parts[0] == "E" and len(parts) == 3:
                history = keys[parts[2]]
                done = history.calls[parts[1]]
                done.ended = line_no
                history.possible = {done.value} | {
                    c.value
                    for c in history.calls.values()
                    if c is not done and (c.ended is None or c.ended > done.started)
                }
            elif parts[0] == "D" and len(parts) == 2:
                keys[parts[1]].possible.add(None)  # dropped by the last tier: absent is fine
        for history in keys.values():  # the kill: the calls in flight may have landed
            history.possible |= {c.value for c in history.in_flight()}
            history.calls.clear()
    return keys


async def check_nothing_undone(root: Path, url: str, rounds: int, name: str) -> int:
    """Reopen the persistent tiers alone and compare every key with the logs; the keys found."""
    scenario = SCENARIOS[name]
    found = 0
    config = StoreConfig(scenario.persistent(root, url), promote_on_hit=False)
    async with TieredStore(config) as store:
        for key, history in read_logs(root, rounds).items():
            got = await store.get(key)
            if got is None:
                # Absent: deleted, dropped, or held only in memory, which a crash loses.
                continue
            served = [
                v
                for v in history.possible
                if v is not None and torch.equal(got, content(key, v, got.numel() // 256))
            ]
            assert served, f"{key}: serves a value undone by a later returned call"
            found += 1
        # Each tier's accounting (copies of one key in two tiers may differ after a crash:
        # the older one's removal was in flight).
        assert [p for tier in store.tiers for p in tier.audit()] == []
    return found


def run_rounds(tmp_path: Path, name: str, url: str = "") -> None:
    rng = random.Random(99)
    checked = 0
    for seed in range(ROUNDS):
        calls = rng.randrange(20, 200)
        kill_after_report(worker, (tmp_path, url, seed, name, calls))
        checked += asyncio.run(check_nothing_undone(tmp_path, url, seed + 1, name))
    assert checked >= ROUNDS, "the restarts found almost nothing to check"


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in SCENARIOS if name not in REDIS_SCENARIOS])
def test_a_returned_put_or_delete_survives_sigkill_at_random_moments(
    tmp_path: Path, name: str
) -> None:
    """``write-ahead``: the disk holds copies of keys whose value lives in memory; a copy a
    later put or delete made stale must never be what a restart serves."""
    run_rounds(tmp_path, name)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("name", REDIS_SCENARIOS)
def test_a_returned_put_or_delete_survives_sigkill_with_a_redis_tier(
    tmp_path: Path, redis_server: RedisProcess, name: str
) -> None:
    """Entries move from disk onto the server while tasks overwrite and delete them; the
    server keeps what the killed store left there, and the restart reads it."""
    run_rounds(tmp_path, name, redis_server.url)
