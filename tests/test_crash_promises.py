"""A store killed (SIGKILL) at random moments while tasks overwrite, delete and spill keys:
after each restart, no put or delete that had returned is undone."""

from __future__ import annotations

import asyncio
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lmtier import StoreConfig, TierConfig, TieredStore
from lmtier.keys import KeyLike

from store_helpers import kill_midway

KIB = 1024
TASKS = 8
KEYS_PER_TASK = 2
# CI's slow run sets LMTIER_CRASH_ROUNDS=30; a plain run kills fewer times.
ROUNDS = int(os.environ.get("LMTIER_CRASH_ROUNDS", "6"))


def content(key: str, version: int) -> torch.Tensor:
    numel = 256 * (1 + version % 4)
    seed = (sum(key.encode()) * 7919 + version * 104_729) % 2**31
    return (torch.arange(numel, dtype=torch.int64) * 40503 + seed).to(torch.int32)


def store_config(root: Path, with_memory: bool = True, write_ahead: bool = False) -> StoreConfig:
    disk = TierConfig("disk", "disk", 48 * KIB, path=str(root / "disk"))
    memory = (TierConfig("cpu", "memory", 4 * KIB),) if with_memory else ()
    return StoreConfig((*memory, disk), write_ahead=write_ahead)


def worker(root: Path, seed: int, write_ahead: bool = False) -> None:
    """Tasks overwrite and delete their own keys (their demotions race each other's puts);
    every call is logged before it starts and after it returns, and every drop."""
    torch.set_num_threads(1)
    log_fd = os.open(root / f"ops-{seed}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str) -> None:
        os.write(log_fd, (line + "\n").encode())  # one write: whole lines even when killed

    def on_drop(key: KeyLike) -> None:
        note(f"D {key}")

    async def task(store: TieredStore, index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        version = seed * 1_000_000  # unique across rounds
        while True:
            key = f"t{index}k{rng.randrange(KEYS_PER_TASK)}"
            version += 1
            if rng.random() < 0.3:
                note(f"S del {key} -1")
                await store.delete(key)
            else:
                note(f"S put {key} {version}")
                await store.put(key, content(key, version))
            note(f"E {key}")

    async def run() -> None:
        config = store_config(root, write_ahead=write_ahead)
        async with TieredStore(config, on_drop=on_drop) as store:
            await asyncio.gather(*(task(store, index) for index in range(TASKS)))

    asyncio.run(run())


@dataclass
class KeyHistory:
    """What the logs say of one key: the values a restart may serve (None: absent)."""

    possible: set[int | None] = field(default_factory=lambda: {None})
    in_flight: int | None = None  # the version of a put in flight, None for a delete
    started: bool = False


def read_logs(root: Path, rounds: int) -> dict[str, KeyHistory]:
    """Replay the logs of every round so far: a returned call fixes what may be served; a
    call in flight when its process was killed may or may not have happened."""
    keys: dict[str, KeyHistory] = defaultdict(KeyHistory)
    for seed in range(rounds):
        for line in (root / f"ops-{seed}.log").read_text().splitlines():
            parts = line.split()
            if parts[0] == "S" and len(parts) == 4:
                history = keys[parts[2]]
                history.in_flight = int(parts[3]) if parts[1] == "put" else None
                history.started = True
            elif parts[0] == "E" and len(parts) == 2:
                history = keys[parts[1]]
                history.possible = {history.in_flight}
                history.started = False
            elif parts[0] == "D" and len(parts) == 2:
                keys[parts[1]].possible.add(None)  # dropped by the last tier: absent is fine
        for history in keys.values():  # the kill: the call in flight may have landed
            if history.started:
                history.possible.add(history.in_flight)
                history.started = False
    return keys


async def check_nothing_undone(root: Path, rounds: int) -> int:
    """Reopen the disk tier alone and compare every key with the logs; the keys found."""
    found = 0
    async with TieredStore(store_config(root, with_memory=False)) as store:
        for key, history in read_logs(root, rounds).items():
            got = await store.get(key)
            if got is None:
                # Absent: deleted, dropped, or held only in memory, which a crash loses.
                continue
            served = [
                v for v in history.possible if v is not None and torch.equal(got, content(key, v))
            ]
            assert served, f"{key}: serves a value undone by a later returned call"
            found += 1
        assert store.audit() == []
    return found


def run_rounds(tmp_path: Path, rounds: int, write_ahead: bool = False) -> None:
    rng = random.Random(99)
    checked = 0
    for seed in range(rounds):
        kill_midway(worker, (tmp_path, seed, write_ahead), rng.uniform(0.1, 0.5))
        checked += asyncio.run(check_nothing_undone(tmp_path, seed + 1))
    assert checked > rounds, "the restarts found almost nothing to check"


@pytest.mark.slow
def test_a_returned_put_or_delete_survives_sigkill_at_random_moments(tmp_path: Path) -> None:
    run_rounds(tmp_path, ROUNDS)


@pytest.mark.slow
def test_copies_written_ahead_never_undo_a_returned_call_across_sigkill(tmp_path: Path) -> None:
    """With ``write_ahead`` the disk holds copies of keys whose value lives in memory: a copy
    a later put or delete made stale must never be what a restart serves."""
    run_rounds(tmp_path, ROUNDS, write_ahead=True)
