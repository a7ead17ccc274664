"""The contract a whole TieredStore keeps over any tier list; a subclass supplies the config.

Every store call of these tests runs in a task whose every step is followed by
``store.audit()``: budgets and exact accounting are checked at every await point, not only
between calls.  Values name their key and version (``tensor_for``), so a read of the wrong
key or of an older version is seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator, Iterable
from types import TracebackType
from typing import Any, TypeVar

import pytest
import torch

from lmtier.config import StoreConfig
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike
from lmtier.store import TieredStore
from lmtier.testing.values import tensor_for

T = TypeVar("T")
MAX_BREACHES = 20  # the first few tell what broke; a broken invariant repeats at every step
SHARED_KEYS = ("a", "b", "c", "d")


class _AuditedSteps(Coroutine[Any, Any, T]):
    """A coroutine that runs ``check`` after each of its steps (each resumption)."""

    def __init__(self, inner: Coroutine[Any, Any, T], check: Callable[[], None]) -> None:
        self._inner = inner
        self._check = check

    def send(self, value: Any) -> Any:
        try:
            return self._inner.send(value)
        finally:
            self._check()

    def throw(  # type: ignore[override]  # the one-argument form, as asyncio calls it
        self, error: BaseException, value: object = None, tb: TracebackType | None = None
    ) -> Any:
        try:
            return self._inner.throw(error)
        finally:
            self._check()

    def close(self) -> None:
        self._inner.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self._inner.__await__()


class WatchedStore:
    """A ``TieredStore`` whose drops are recorded and whose audit runs at every task step.

    Use it as ``async with WatchedStore(config) as watched``; run calls through
    ``watched.run(...)`` or ``asyncio.gather`` (both make tasks, whose steps are audited).
    """

    def __init__(self, config: StoreConfig) -> None:
        self.store = TieredStore(config, on_drop=self._dropped)
        self.dropped: set[KeyLike] = set()
        self.breaches: list[str] = []
        self._previous_factory: Any = None

    def _dropped(self, key: KeyLike) -> None:
        self.dropped.add(key)

    def _audit(self) -> None:
        if len(self.breaches) < MAX_BREACHES:
            self.breaches.extend(self.store.audit())

    def _task(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        return asyncio.Task(_AuditedSteps(coro, self._audit), loop=loop, **kwargs)

    async def __aenter__(self) -> WatchedStore:
        await self.store.open()
        loop = asyncio.get_running_loop()
        self._previous_factory = loop.get_task_factory()
        loop.set_task_factory(self._task)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.run(self.store.close())
        finally:
            asyncio.get_running_loop().set_task_factory(self._previous_factory)
        if exc_info[0] is None:
            self.assert_kept()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Await ``work`` as a task of its own, so that each of its steps is audited."""
        return await asyncio.create_task(work)

    def assert_kept(self) -> None:
        """No audit at any step found a problem, and none finds one now."""
        assert self.breaches == [], self.breaches
        assert self.store.audit() == []

    async def assert_found_or_dropped(self, key: KeyLike, expected: torch.Tensor) -> None:
        """``key`` reads back as ``expected`` bit for bit, or was dropped by the last tier."""
        got = await self.run(self.store.get(key))
        if got is None:
            assert key in self.dropped, f"{key!r} was lost without a drop"
        else:
            assert got.dtype == expected.dtype and got.shape == expected.shape, key
            assert torch.equal(got.cpu(), expected), f"{key!r} read back other bytes"


def chunk_numel(config: StoreConfig) -> int:
    """int32 values per chunk: an eighth of the smallest tier, so every tier holds several."""
    smallest = min(tier.max_size_bytes for tier in config.tiers)
    return max(16, min(4096, smallest // 8 // 4))


class StoreContract:
    """The store's invariants (docs/architecture.md, DESIGN's list) over one tier list.

    Override the ``store_config`` fixture: a ``StoreConfig`` (``config_from_mapping`` builds one
    from a YAML file's content) of small tiers, a few KiB to a few MiB each, so the tests spill
    through every tier.  It may ask for other fixtures (``tmp_path`` for a disk folder, a
    server of your own) and is called once per test; a test that reopens the store builds a
    second store from the same config, so a persistent tier must find its entries again under
    it.  The tests are coroutines: run them with pytest-asyncio in auto mode.

    Inherited tests: bit-exact round trips; spills that lose nothing but counted drops; bursts
    larger than the top tier; overlapping puts of one key; puts cancelled at every step; puts,
    gets, deletes and cancellations racing on shared keys; deletes and overwrites racing
    demotions and then a restart.  Each checks budgets and exact accounting at every step.
    """

    @pytest.fixture
    def store_config(self) -> StoreConfig:
        """The configuration every test of the contract builds its store from."""
        raise NotImplementedError(f"{type(self).__name__} must define the store_config fixture")

    async def test_round_trip_is_bit_exact(self, store_config: StoreConfig) -> None:
        cases = {
            "f32": torch.randn(3, 7),
            "bf16": torch.randn(2, 4, 8).to(torch.bfloat16),
            "i8": torch.randint(-128, 127, (33,), dtype=torch.int8),
            "bool": torch.rand(17) > 0.5,
            "strided": torch.randn(8, 8).t(),
        }
        async with WatchedStore(store_config) as watched:
            for key, tensor in cases.items():
                assert await watched.run(watched.store.put(key, tensor)) is PutStatus.LEGAL
            for key, tensor in cases.items():
                got = await watched.run(watched.store.get(key))
                assert got is not None, key
                assert got.dtype == tensor.dtype and got.shape == tensor.shape
                assert torch.equal(got.cpu(), tensor)

    async def test_a_spill_loses_nothing_but_counted_drops(self, store_config: StoreConfig) -> None:
        numel = chunk_numel(store_config)
        total = sum(tier.max_size_bytes for tier in store_config.tiers)
        keys = [f"k{i}" for i in range(2 * total // (4 * numel) + 4)]
        async with WatchedStore(store_config) as watched:
            for key in keys:
                status = await watched.run(watched.store.put(key, tensor_for(key, 0, numel)))
                assert status is PutStatus.LEGAL, key
            for key in keys:
                await watched.assert_found_or_dropped(key, tensor_for(key, 0, numel))
            assert watched.dropped, "twice the store's bytes were put: some must be dropped"
            assert watched.store.stats()["drops"] >= 1

    async def test_bursts_larger_than_the_top_tier_land_without_waiting_out(
        self, store_config: StoreConfig
    ) -> None:
        numel = chunk_numel(store_config)
        per_burst = 2 * store_config.tiers[0].max_size_bytes // (4 * numel)
        bursts = [
            [(f"r{r}k{i}", tensor_for(f"r{r}k{i}", 0, numel)) for i in range(per_burst)]
            for r in range(4)
        ]
        async with WatchedStore(store_config) as watched:
            results = await asyncio.gather(*(watched.store.put_many(b) for b in bursts))
            assert [s for statuses in results for s in statuses] == [PutStatus.LEGAL] * (
                4 * per_burst
            )
            for info in watched.store.tier_infos():
                assert info.counters["room_timeouts"] == 0, info.name
            for burst in bursts:
                for key, value in burst:
                    await watched.assert_found_or_dropped(key, value)

    async def test_overlapping_puts_of_one_key_then_a_fill_keep_the_accounting(
        self, store_config: StoreConfig
    ) -> None:
        numel = chunk_numel(store_config)
        big = tensor_for("k", 1, store_config.tiers[0].max_size_bytes // 2 // 4)
        small = tensor_for("k", 2, numel)
        total = sum(tier.max_size_bytes for tier in store_config.tiers)
        async with WatchedStore(store_config) as watched:
            for first, second in ((big, small), (small, big)):
                statuses = await asyncio.gather(
                    watched.store.put("k", first), watched.store.put("k", second)
                )
                assert list(statuses) == [PutStatus.LEGAL, PutStatus.LEGAL]
                watched.dropped.discard("k")
                await watched.assert_found_or_dropped("k", second)  # the later call wins
            for i in range(3 * total // (4 * numel)):  # turn the store over three times
                fill = f"fill{i}"
                put = watched.store.put(fill, tensor_for(fill, 0, numel))
                assert await watched.run(put) is PutStatus.LEGAL
                assert watched.store.audit() == [], i

    async def test_a_cancelled_put_leaves_the_old_value_or_the_new_one_whole(
        self, store_config: StoreConfig
    ) -> None:
        """A put cancelled after each number of loop turns: a reader racing it, and a read
        after it, find the old value or the new one, bit-exact, never a part of either."""
        numel = chunk_numel(store_config)
        async with WatchedStore(store_config) as watched:
            store = watched.store
            for turns in range(12):
                key = f"c{turns}"
                old, new = tensor_for(key, 0, numel), tensor_for(key, 1, numel)
                assert await watched.run(store.put(key, old)) is PutStatus.LEGAL
                reads: list[torch.Tensor | None] = []
                put = asyncio.create_task(store.put(key, new))
                reader = asyncio.create_task(_read_until(store, key, put, reads))
                for _ in range(turns):
                    await asyncio.sleep(0)
                put.cancel()
                await asyncio.gather(put, reader, return_exceptions=True)
                await watched.run(store.settle())
                got = await watched.run(store.get(key))
                for value in [*reads, got]:
                    if value is None:
                        assert key in watched.dropped, f"{key} vanished without a drop"
                    else:
                        assert torch.equal(value, old) or torch.equal(value, new), key

    async def test_calls_racing_on_shared_keys_keep_every_invariant(
        self, store_config: StoreConfig
    ) -> None:
        """Puts of several sizes, gets, deletes and cancelled puts of four keys from 12 tasks,
        with filler puts spilling the tiers: every read is some version put of its key."""
        numel = chunk_numel(store_config)
        total = sum(tier.max_size_bytes for tier in store_config.tiers)
        fills = total // (4 * numel)
        versions: dict[str, list[torch.Tensor]] = {key: [] for key in SHARED_KEYS}
        wrong: list[str] = []

        async def worker(task: int) -> None:
            for step in range(24):
                key = SHARED_KEYS[(task + step) % len(SHARED_KEYS)]
                action = (task * 7 + step * 3) % 6
                value = tensor_for(key, task * 100 + step, numel * (1 + step % 3))
                if action in (0, 1):
                    versions[key].append(value)
                    await store.put(key, value)
                elif action == 2:
                    versions[key].append(value)
                    put = asyncio.create_task(store.put(key, value))
                    for _ in range(step % 5):
                        await asyncio.sleep(0)
                    put.cancel()
                    await asyncio.gather(put, return_exceptions=True)
                elif action == 3:
                    await store.delete(key)
                elif action == 4:
                    got = await store.get(key)
                    if got is not None and not any(torch.equal(got, v) for v in versions[key]):
                        wrong.append(f"{key}: bytes no put wrote")
                else:
                    fill = f"fill{(task * 24 + step) % fills}"
                    await store.put(fill, tensor_for(fill, 0, numel))

        async with WatchedStore(store_config) as watched:
            store = watched.store
            await asyncio.gather(*(worker(task) for task in range(12)))
            await watched.run(store.settle())
            assert wrong == []
            for key in SHARED_KEYS:  # one writer now: the last call decides
                final = tensor_for(key, 10_000, numel)
                assert await watched.run(store.put(key, final)) is PutStatus.LEGAL
                watched.dropped.discard(key)
                await watched.assert_found_or_dropped(key, final)
                assert await watched.run(store.delete(key))
                assert await watched.run(store.get(key)) is None
                assert store.holder(key) is None

    async def test_deletes_and_overwrites_racing_demotions_are_never_undone(
        self, store_config: StoreConfig
    ) -> None:
        """Deletes and overwrites run while filler puts demote their keys; after they return,
        and after the store is closed and reopened, a deleted key is gone and an overwritten
        key never reads as its older value."""
        numel = chunk_numel(store_config)
        top = store_config.tiers[0].max_size_bytes
        keys = [f"k{i}" for i in range(max(2, top // (4 * numel)))]
        deleted, overwritten = keys[::2], keys[1::2]
        fills = [f"fill{i}" for i in range(3 * top // (4 * numel))]
        async with WatchedStore(store_config) as watched:
            store = watched.store
            for key in keys:
                put = store.put(key, tensor_for(key, 0, numel))
                assert await watched.run(put) is PutStatus.LEGAL
            await asyncio.gather(
                *(store.put(fill, tensor_for(fill, 0, numel)) for fill in fills),
                *(store.delete(key) for key in deleted),
                *(store.put(key, tensor_for(key, 1, numel)) for key in overwritten),
            )
            await _assert_never_undone(watched, deleted, overwritten, numel, restarted=False)
        async with WatchedStore(store_config) as reopened:
            await _assert_never_undone(reopened, deleted, overwritten, numel, restarted=True)


async def _read_until(
    store: TieredStore, key: str, writer: asyncio.Task[Any], reads: list[torch.Tensor | None]
) -> None:
    """Read ``key`` at every loop turn until ``writer`` is done (at least once)."""
    while True:
        reads.append(await store.get(key))
        if writer.done():
            return
        await asyncio.sleep(0)


async def _assert_never_undone(
    watched: WatchedStore,
    deleted: Iterable[str],
    overwritten: Iterable[str],
    numel: int,
    restarted: bool,
) -> None:
    for key in deleted:
        assert await watched.run(watched.store.get(key)) is None, f"deleted {key} came back"
    for key in overwritten:
        if not restarted:  # a memory tier keeps nothing across a restart: None is allowed there
            await watched.assert_found_or_dropped(key, tensor_for(key, 1, numel))
            continue
        got = await watched.run(watched.store.get(key))
        if got is not None:
            assert torch.equal(got, tensor_for(key, 1, numel)), f"{key} read an older value"
