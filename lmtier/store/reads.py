"""Reads: ``get`` and ``get_many`` over the cascade, and fetches from shared storage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import torch

from lmtier.errors import DeviceUnavailableError, InvalidValueError
from lmtier.keys import KeyLike
from lmtier.monitoring import StoreMetrics
from lmtier.store.cascade import Cascade, Hit
from lmtier.store.ledger import KeyLedger
from lmtier.store.loading import Loader
from lmtier.store.tasks import Background, Operation
from lmtier.tiers.batch_copies import run_steps, to_device_views
from lmtier.tiers.copies import INLINE_COPY_BYTES, copy_into, copy_pairs, copy_to

__all__ = ["Reader", "as_device"]

# A get whose entry moved or was replaced while it read looks again, at most this often.
_MAX_LOOKUPS = 4
# A get_into_many hands the loop back after reading this much on it in one pass (~1 ms).
_YIELD_BYTES = 8 << 20
# The reads of a get_into_many that wait on storage run this many at a time: each takes a
# thread, and more than a few on a node's spare cores only take turns.
_WAITING_READS = 4

#: Copies ``key``'s hit (its bytes read out) to the top of the cascade.
Promote = Callable[[KeyLike, Hit, torch.Tensor], Coroutine[Any, Any, None]]
#: A store's ``get(key, out=out)``: the fallback of a get_into_many.
GetInto = Callable[[KeyLike, torch.Tensor], Awaitable[torch.Tensor | None]]


class Reader:
    """Serves gets: finds the key, copies its entry out (pinned while it reads), counts the
    hit, and promotes a lower hit when the config says so."""

    #: Devices a get_many copies host hits to as one copy per run of them.
    batch_to: frozenset[str] = frozenset({"cuda"})

    def __init__(
        self,
        cascade: Cascade,
        ledger: KeyLedger,
        loader: Loader,
        metrics: StoreMetrics,
        background: Background,
        promote: Promote,
        promote_on_hit: bool,
    ) -> None:
        self._cascade = cascade
        self._ledger = ledger
        self._loader = loader
        self._metrics = metrics
        self._background = background
        self._promote = promote
        self._promote_on_hit = promote_on_hit

    # ------------------------------------------------------------------ one key
    async def get(
        self,
        key: KeyLike,
        target: torch.device | None,
        out: torch.Tensor | None,
        hit: Hit | None,
        op: Operation | None = None,
    ) -> torch.Tensor | None:
        """A copy of ``key``'s entry from where ``hit`` found it, looking again if it moved
        meanwhile; ``op``, a timed call, learns the tier and bytes of the hit."""
        cascade = self._cascade
        if hit is not None and not hit.current(key):
            hit = cascade.find(key)  # it changed while this call waited for its turn
        for attempt in range(_MAX_LOOKUPS):
            if attempt:
                hit = cascade.find(key)
            if hit is None:
                # Only a key no index held: one that was dropped just now stays a miss.
                if attempt or not cascade.shared:
                    return None
                return await self._fetch_shared(key, target, out, op)
            tier = hit.tier
            result = self._read_now(hit, target, out)
            if result is None:
                tier.pin(key)
                try:
                    data = await self._loader.load_or_drop(tier, key, hit.obj, out)
                    if data is None:
                        if hit.current(key):
                            return None  # an error of the environment: a miss; it stays
                        continue  # moved, replaced or lost while we read: look again
                    result = data
                    if out is None:
                        home = target or tier.home_device
                        result = await copy_to(data, home, tier.loads_are_private)
                finally:
                    tier.unpin(key)
            self.record_hit(key, hit, op)
            # Unpinned first: a promotion may wait for room that only this entry's eviction
            # from its own tier would make; the move simply goes stale if that happens.
            if self._promotes(key, hit):
                await self._background.run(self._promote(key, hit, result))
            return result
        return None

    def record_hit(self, key: KeyLike, hit: Hit, op: Operation | None = None) -> None:
        """Count a hit: the tier's counters and evictor, the admission observers, ``op``."""
        size = hit.tier.record_hit(key, hit.obj)
        if op is not None:
            op.found(hit.tier.name, size)
        for admission in self._cascade.observers:  # evidence for the admission policies
            admission.observe(key, size)

    def _promotes(self, key: KeyLike, hit: Hit) -> bool:
        return bool(hit.index) and self._promote_on_hit and not hit.tier.is_leaving(key)

    def _read_now(
        self, hit: Hit, target: torch.device | None, out: torch.Tensor | None
    ) -> torch.Tensor | None:
        """A copy of a small host entry held in memory, made on the spot: no await, so no pin
        (nothing can evict it meanwhile); None where the read must wait."""
        if out is not None or (target is not None and target.type != "cpu"):
            return None
        stored = hit.tier.resident_tensor(hit.obj)
        if stored is None or not stored.is_cpu or stored.nbytes >= INLINE_COPY_BYTES:
            return None
        return stored.detach().clone()

    def _hit_now(
        self, key: KeyLike, hit: Hit | None, target: torch.device | None
    ) -> torch.Tensor | None:
        """A hit served on the spot (no promotion due, and ``_read_now`` could copy it)."""
        if hit is None or self._promotes(key, hit):
            return None
        result = self._read_now(hit, target, None)
        if result is not None:
            self.record_hit(key, hit)
        return result

    async def _fetch_shared(
        self,
        key: KeyLike,
        target: torch.device | None,
        out: torch.Tensor | None,
        op: Operation | None,
    ) -> torch.Tensor | None:
        """A key no index holds may be in a shared tier's storage (another store wrote it)."""
        ledger, cascade = self._ledger, self._cascade
        if key in ledger.moving:
            return None  # the server may hold a stale move's value until the move removes it
        for index, tier in enumerate(cascade.tiers):
            if not tier.shared:
                continue
            deletes = ledger.deletes
            started = time.perf_counter()
            found = await tier.fetch(key)
            if found is None:
                continue
            obj, data = found
            tier.record_fetch(data.nbytes)
            self._metrics.observe_load(tier.name, time.perf_counter() - started, data.nbytes)
            if op is not None:
                op.found(tier.name, data.nbytes)
            # Indexed only if no tier took the key meanwhile (a put that committed is newer)
            # and no delete ran while the value was on its way (it may have been the key's).
            adopted = (
                cascade.holder(key) is None
                and deletes == ledger.deletes
                and key not in ledger.moving
                and tier.try_adopt(key, obj)
            )
            if adopted:
                tier.touch(key)
            if out is not None:
                result = await copy_into(out, data)
            else:
                result = await copy_to(data, target or tier.home_device, private=True)
            if adopted and index and self._promote_on_hit:
                await self._background.run(self._promote(key, Hit(index, tier, obj), result))
            return result
        return None

    # ------------------------------------------------------------------ many keys
    async def get_many(
        self, keys: Sequence[KeyLike], target: torch.device | None
    ) -> list[torch.Tensor | None]:
        """``get`` for each key: small host hits served on the spot, host hits bound for a GPU
        copied as one batch, the others read concurrently; promotions last."""
        results: list[torch.Tensor | None] = [None] * len(keys)
        in_memory: list[tuple[int, KeyLike, Hit]] = []  # copied as one batch
        promoting: list[tuple[int, Hit]] = []  # of those, due for promotion
        later: list[tuple[int, Any]] = []
        for i, key in enumerate(keys):
            hit = self._cascade.find(key)
            results[i] = self._hit_now(key, hit, target)
            if results[i] is not None:
                continue
            if hit is not None:
                resident = hit.tier.resident_tensor(hit.obj)
                promotes = self._promotes(key, hit)
                # Host hits bound for a GPU move as one batch, promoted or not.
                if resident is not None and (not promotes or self._batches(resident, target)):
                    hit.tier.pin(key)
                    in_memory.append((i, key, hit))
                    if promotes:
                        promoting.append((i, hit))
                    continue
            if hit is not None or self._cascade.shared:
                later.append((i, self.get(key, target, None, hit)))
        if in_memory and not later:
            await self._copy_hits(in_memory, target, results)  # no task to make
        elif in_memory or later:
            done = await asyncio.gather(
                self._copy_hits(in_memory, target, results), *(work for _, work in later)
            )
            for (i, _), result in zip(later, done[1:], strict=True):
                results[i] = result
        await self._promote_hits(keys, promoting, results)
        return results

    async def get_into_many(
        self, keys: Sequence[KeyLike], outs: Sequence[torch.Tensor], get_into: GetInto
    ) -> list[torch.Tensor | None]:
        """``get_into(key, out)`` for each pair, but a hit that its tier copies on the spot
        (``load_now_into``: no wait, so no pin) is read in one pass with no task of its own;
        the others, and hits due for promotion, go to ``get_into``, a few at a time."""
        results: list[torch.Tensor | None] = [None] * len(keys)
        later: list[int] = []
        timed, gets = self._metrics.timed_loads, self._metrics.gets
        since_yield = 0
        for i, (key, out) in enumerate(zip(keys, outs, strict=True)):
            if since_yield >= _YIELD_BYTES:  # other connections' requests wait meanwhile
                await asyncio.sleep(0)
                since_yield = 0
            hit = self._cascade.find(key)  # after the yield: the entry as it is now
            if hit is None or self._promotes(key, hit):
                later.append(i)
                continue
            tier = hit.tier
            started = time.perf_counter()
            if tier.load_now_into(hit.obj, out) is None:
                later.append(i)
                continue
            since_yield += out.nbytes
            results[i] = out
            self.record_hit(key, hit)
            if tier.name in timed or gets is not None:
                seconds = time.perf_counter() - started
                if tier.name in timed:
                    self._metrics.observe_load(tier.name, seconds, out.nbytes)
                if gets is not None:
                    gets[tier.name].observe(seconds, out.nbytes)
        if later:
            turns = asyncio.Semaphore(_WAITING_READS)

            async def read(i: int) -> None:
                async with turns:
                    results[i] = await get_into(keys[i], outs[i])

            await asyncio.gather(*(read(i) for i in later))
        return results

    def _batches(self, stored: torch.Tensor, target: torch.device | None) -> bool:
        """Whether a host hit bound for ``target`` is copied there with others as one batch."""
        return target is not None and target.type in self.batch_to and stored.is_cpu

    async def _promote_hits(
        self,
        keys: Sequence[KeyLike],
        promoting: list[tuple[int, Hit]],
        results: list[torch.Tensor | None],
    ) -> None:
        """Promote batch-copied hits from their copies, as ``get`` promotes its hit."""
        moves = []
        for i, hit in promoting:
            result = results[i]
            if result is not None and self._promotes(keys[i], hit):
                moves.append(self._background.run(self._promote(keys[i], hit, result)))
        if moves:
            await asyncio.gather(*moves)

    async def _copy_hits(
        self,
        hits: list[tuple[int, KeyLike, Hit]],
        target: torch.device | None,
        results: list[torch.Tensor | None],
    ) -> None:
        """Copy pinned in-memory hits out as one batch, then count them: host hits bound for a
        GPU with one copy per run of them (``to_device_views``), the others with
        ``copy_pairs``."""
        pairs = []
        batch: list[tuple[int, torch.Tensor]] = []
        try:
            for i, _, hit in hits:
                stored = hit.tier.resident_tensor(hit.obj)
                assert stored is not None
                if self._batches(stored, target):
                    batch.append((i, stored))
                    continue
                out = torch.empty(
                    stored.shape, dtype=stored.dtype, device=target or hit.tier.home_device
                )
                results[i] = out
                pairs.append((out, stored))
            if batch:
                assert target is not None
                outs, steps = to_device_views([stored for _, stored in batch], target)
                for (i, _), out in zip(batch, outs, strict=True):
                    results[i] = out
                await run_steps(steps)
            if pairs:
                await copy_pairs(pairs)
        finally:
            for _, key, hit in hits:
                hit.tier.unpin(key)
        for _, key, hit in hits:
            self.record_hit(key, hit)


def as_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` parsed and checked up front, so that a node without it fails on its first
    call, not once its cache is warm."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidValueError(f"not a device: {device!r}") from exc
    kind = parsed.type
    if kind == "cpu":
        return parsed
    if kind == "meta":
        raise InvalidValueError("a get onto the meta device would return no data")
    backend = getattr(torch, kind, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise DeviceUnavailableError(f"device {device!r}: this machine has no {kind} device")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise DeviceUnavailableError(
            f"device {device!r}: this machine has {count()} {kind} devices"
        )
    return parsed
