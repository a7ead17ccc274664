"""TieredStore: the cascade of tiers, with demotion, promotion and per-entry moves."""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from lmtier import serde
from lmtier.admission import AdmitAll
from lmtier.config import StoreConfig, config_from_mapping, load_config
from lmtier.errors import (
    CorruptEntryError,
    DeviceUnavailableError,
    InvalidValueError,
    LmtierTypeError,
    StorageError,
    StoreClosedError,
    TierUnavailableError,
)
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike, check_key
from lmtier.monitoring import OperationHistograms, StoreMetrics
from lmtier.tiers.base import Tier, cascade_stats
from lmtier.tiers.batch_copies import run_steps, to_device_views
from lmtier.tiers.copies import INLINE_COPY_BYTES, copy_into, copy_pairs, copy_to
from lmtier.tiers.factory import build_tiers

__all__ = ["TieredStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# A get whose entry moved or was replaced while it read looks again, at most this often.
_MAX_LOOKUPS = 4
# Moves that leave their source in place: the copy is clean (see the class docstring).
_KEEPS_SOURCE = ("promotions_in", "written_ahead")
#: With ``write_ahead``, a commit into a memory tier copies down the entries that this many
#: more puts of its size would evict, at most ``MAX_WRITES_AHEAD`` copies at a time.
WRITE_AHEAD_PUTS = 4
MAX_WRITES_AHEAD = 8
#: Evicted entries whose storage is being released in the background at most (beyond it an
#: eviction waits for its own release): what a folder may hold over its budget meanwhile.
MAX_DISCARDS_BEHIND = 32


class _Outcome(enum.Enum):
    PLACED = enum.auto()
    REFUSED = enum.auto()  # no candidate tier took it
    FAILED = enum.auto()  # a tier took it but could not write it (and no later tier did)
    STALE = enum.auto()  # the moved entry was deleted or replaced meanwhile


@dataclass
class _Attempt:
    """One pass over the candidate tiers: its outcome, the tiers that had no room for now
    (worth waiting for) and those whose write failed (skipped for the rest of the placement)."""

    outcome: _Outcome
    full: list[Tier] = field(default_factory=list)
    failed: list[Tier] = field(default_factory=list)

    def fail(self, tier: Tier) -> None:
        self.outcome = _Outcome.FAILED
        self.failed.append(tier)


class TieredStore:
    """KV-cache chunks under keys, kept across an ordered list of tiers.

    A put lands in the first tier whose evictor makes room; the victims move down one tier at a
    time and the last tier's are dropped (and counted, and passed to ``on_drop``).  A get
    searches top-down and copies a lower hit to the top when ``promote_on_hit``.  A moving
    entry stays readable in its source until the destination commits it.

    Copies, as ``audit`` checks them:

    * a key's *authoritative* entry is the one in the highest tier holding it; a get reads it;
    * a promotion leaves its source entry in place as a *clean copy*: the same bytes, counted
      in that tier's budget and evictable there as any entry.  A key may have clean copies in
      any tiers below its authoritative one, and only there;
    * a put or delete of the key removes every copy, so a copy is never older than the value;
    * demoting an entry that has a clean copy below writes nothing: the copy takes over.  A
      clean copy chosen as a victim is dropped without a move (the key stays above);
    * with ``write_ahead``, a memory tier that a commit leaves nearly full copies its next
      victims to the tier below as clean copies, in the background; a victim whose copy is
      on its way waits for it, then hands over.
    """

    def __init__(
        self,
        config: StoreConfig | Mapping[str, Any],
        *,
        on_drop: Callable[[KeyLike], None] | None = None,
    ) -> None:
        """``config``: a ``StoreConfig``, or a mapping validated exactly as a YAML file's
        content (``LMTIER_*`` overrides included)."""
        if not isinstance(config, StoreConfig):
            if not isinstance(config, Mapping):
                raise LmtierTypeError(
                    f"config must be a StoreConfig or a mapping, got {type(config).__name__}"
                )
            config = config_from_mapping(config)
        self.config = config
        self.tiers: list[Tier] = build_tiers(config)
        #: Prometheus metrics: a registry of its own, served over HTTP if the config says so.
        self.metrics = StoreMetrics(config.metrics, self.tiers)
        self._shared = any(tier.shared for tier in self.tiers)  # a miss then asks the server
        # Admission policies that learn from hits (admitting everything learns nothing).
        self._observers = [t.admission for t in self.tiers if not isinstance(t.admission, AdmitAll)]
        self._on_drop = on_drop
        self._positions: dict[KeyLike, int] = {}  # chunk index in its prefix, for evictors
        # Keys with a put in flight, and those of them whose older value was dropped meanwhile:
        # the drop is reported only if the put fails, since otherwise the key was never gone.
        self._putting: Counter[KeyLike] = Counter()
        self._drops_held: set[KeyLike] = set()
        # Puts are numbered as they are called; while puts of a key are in flight, the number
        # of the newest one that committed: an older put (e.g. one whose caller was cancelled
        # and which finished in the background) never replaces a newer value.
        self._tickets = 0
        self._newest_put: dict[KeyLike, int] = {}
        # Keys with a demotion or promotion in flight: a shared tier's value of such a key may
        # be a move's write that a delete or put has made stale, so it is never adopted.
        self._moving: Counter[KeyLike] = Counter()
        # Keys being copied down ahead of their eviction (``write_ahead``): what their
        # demotion waits for, so that it hands over to the copy instead of writing again.
        self._writing_ahead: dict[KeyLike, asyncio.Future[None]] = {}
        # Evicted entries whose storage a tier releases in the background (``discards_behind``):
        # a put or delete of the key waits for them, so no older value outlives its return.
        self._discarding: dict[KeyLike, set[asyncio.Task[None]]] = {}
        self._deletes = 0  # deletes so far: a fetch that overlapped one adopts nothing
        self._tasks: set[asyncio.Task[Any]] = set()
        self._active = 0
        self._idle: asyncio.Event | None = None
        self._opened: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_config_file(
        cls, path: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> TieredStore:
        """A store from a YAML file (``path``, else ``$LMTIER_CONFIG``), with LMTIER_* overrides."""
        return cls(load_config(path), **kwargs)

    def __del__(self) -> None:
        # getattr: a constructor that raised leaves a half-built object behind.
        if getattr(self, "_opened", None) is not None and not getattr(self, "_closed", True):
            warnings.warn(
                f"a TieredStore was never closed: its disk tiers keep their folders locked "
                f"until the process ends ({[tier.name for tier in self.tiers]})",
                ResourceWarning,
                stacklevel=2,
            )

    async def __aenter__(self) -> TieredStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Prepare every tier's storage; the first operation does it if nobody did."""
        if self._closed:
            raise StoreClosedError("the store is closed")
        if self._opened is None:
            self._opened = asyncio.ensure_future(self._open_tiers())
        await asyncio.shield(self._opened)

    async def _open_tiers(self) -> None:
        self.metrics.serve()  # first: a port in use fails the open before a folder is locked
        try:
            for tier in self.tiers:
                await tier.open()
        except BaseException:
            await self.metrics.stop()  # so that a retried open finds its port free
            raise

    async def close(self) -> None:
        """Finish in-flight work, then release the tiers; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        while self._active or self._tasks:
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            if self._active:
                await self._idle_event().wait()
        if self._opened is not None:
            await asyncio.gather(self._opened, return_exceptions=True)
            for tier in self.tiers:
                await tier.close()
        await self.metrics.stop()

    @property
    def metrics_port(self) -> int | None:
        """The port of the metrics HTTP server while it serves (the one chosen for port 0)."""
        return self.metrics.port

    # ------------------------------------------------------------------ public API
    async def put(
        self, key: KeyLike, tensor: torch.Tensor, *, position: int | None = None
    ) -> PutStatus:
        """Store ``tensor`` under ``key`` (replacing any entry); ILLEGAL if no tier can hold it.

        ``position`` is the chunk's index in its prefix chain (0 for the first chunk); each
        tier's evictor sees it on this put and on the entry's later moves.
        """
        key = check_key(key)
        serde.check_storable(tensor)
        if position is not None:
            self._positions[key] = position
        async with _Operation(self, self.metrics.puts, tensor.nbytes) as op:
            outcome = await self._background(self._put(key, tensor))
            if outcome is _Outcome.PLACED and op.histograms is not None:
                holder = self._holder(key)
                op.tier = None if holder is None else holder.name
        return PutStatus.LEGAL if outcome is _Outcome.PLACED else PutStatus.ILLEGAL

    async def put_many(
        self,
        items: Iterable[tuple[KeyLike, torch.Tensor]],
        *,
        positions: Mapping[KeyLike, int] | None = None,
    ) -> list[PutStatus]:
        """``put`` for each item, concurrently; a key given twice takes its last tensor.

        ``positions`` maps keys to their chunk index in a prefix chain, as ``put``'s.
        """
        items = [(check_key(key), serde.check_storable(tensor)) for key, tensor in items]
        last = {key: tensor for key, tensor in items}
        for key, position in (positions or {}).items():
            if key in last:
                self._positions[key] = position
        async with _Operation(self):  # one call in flight and one background task per batch
            done = await self._background(self._put_all(last))
        placed = {key: outcome is _Outcome.PLACED for key, outcome in zip(last, done, strict=True)}
        return [PutStatus.LEGAL if placed[key] else PutStatus.ILLEGAL for key, _ in items]

    async def _put_all(self, items: Mapping[KeyLike, torch.Tensor]) -> list[_Outcome]:
        # Numbered first, as called: staging awaits, and a put called meanwhile is newer.
        tickets = [self._begin_put(key) for key in items]
        tier = self.tiers[0]
        try:
            staged = await self._stage(tier, list(items.values()))
        except BaseException:
            for key in items:
                self._end_put(key)
            raise
        try:
            return await asyncio.gather(
                *(
                    self._put(key, tensor if view is None else view, ticket)
                    for (key, tensor), view, ticket in zip(
                        items.items(), staged, tickets, strict=True
                    )
                )
            )
        finally:
            for view in staged:
                if view is not None:
                    tier.release_staged(view)

    #: Devices whose tensors a batch (put_many, the victims of one eviction) stages into a
    #: host tier as one copy, and devices a get_many copies host hits to as one copy per run.
    _stage_from: frozenset[str] = frozenset({"cuda"})
    _batch_to: frozenset[str] = frozenset({"cuda"})

    async def _stage(
        self, tier: Tier, tensors: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        """Host copies of the GPU tensors of a batch, made by ``tier`` as one batch (None for
        each tensor it did not stage); its placements then read or adopt them."""
        chosen = [
            i for i, t in enumerate(tensors) if t.device.type in self._stage_from and t.nbytes
        ]
        staged: list[torch.Tensor | None] = [None] * len(tensors)
        if not chosen:
            return staged
        try:
            views = await tier.stage([tensors[i].detach() for i in chosen])
        except Exception as exc:  # the batch is an optimization: copy chunk by chunk instead
            log.warning("tier %r could not stage a batch: %s", tier.name, exc)
            return staged
        for i, view in zip(chosen, views, strict=True):
            staged[i] = view
        return staged

    async def get(
        self,
        key: KeyLike,
        device: str | torch.device | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """A copy of the entry under ``key`` on ``device`` (default: its tier's), or None.

        With ``out`` (a tensor of the entry's shape and dtype, e.g. a preallocated engine
        buffer) the entry is copied into it and ``out`` is returned; ``device`` is ignored.
        """
        key = check_key(key)
        target = _as_device(device)
        if out is not None:
            serde.check_storable(out)
            if out.requires_grad:
                raise InvalidValueError("out requires grad: pass a tensor without autograd")
        async with _Operation(self, self.metrics.gets) as op:
            return await self._get(key, target, out, self._find(key), op)

    async def get_many(
        self, keys: Sequence[KeyLike], device: str | torch.device | None = None
    ) -> list[torch.Tensor | None]:
        """``get`` for each key, as one call: small host hits are served on the spot, the
        other keys' reads run concurrently.  Every key is looked up before any promotion, so
        a key given twice is found where it was when the call began."""
        keys = [check_key(key) for key in keys]
        target = _as_device(device)
        results: list[torch.Tensor | None] = [None] * len(keys)
        in_memory: list[tuple[int, KeyLike, Tier, Any]] = []  # copied as one batch
        promoting: list[tuple[int, tuple[int, Tier, Any]]] = []  # of those, due for promotion
        later: list[tuple[int, Any]] = []
        async with _Operation(self):
            for i, key in enumerate(keys):
                found = self._find(key)
                results[i] = self._hit_now(key, found, target)
                if results[i] is not None:
                    continue
                if found is not None:
                    _, tier, obj = found
                    resident = tier.resident_tensor(obj)
                    promotes = self._promotes(key, found)
                    # Host hits bound for a GPU move as one batch, promoted or not.
                    if resident is not None and (not promotes or self._batches(resident, target)):
                        tier.pin(key)
                        in_memory.append((i, key, tier, obj))
                        if promotes:
                            promoting.append((i, found))
                        continue
                if found is not None or self._shared:
                    later.append((i, self._get(key, target, None, found)))
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

    def _batches(self, stored: torch.Tensor, target: torch.device | None) -> bool:
        """Whether a host hit bound for ``target`` is copied there with others as one batch."""
        return target is not None and target.type in self._batch_to and stored.is_cpu

    async def _promote_hits(
        self,
        keys: Sequence[KeyLike],
        promoting: list[tuple[int, tuple[int, Tier, Any]]],
        results: list[torch.Tensor | None],
    ) -> None:
        """Promote batch-copied hits from their copies, as ``_get`` promotes its hit."""
        moves = []
        for i, found in promoting:
            result = results[i]
            if result is not None and self._promotes(keys[i], found):
                moves.append(self._background(self._promote(found[0], keys[i], found[2], result)))
        if moves:
            await asyncio.gather(*moves)

    async def _copy_hits(
        self,
        hits: list[tuple[int, KeyLike, Tier, Any]],
        target: torch.device | None,
        results: list[torch.Tensor | None],
    ) -> None:
        """Copy pinned in-memory hits out as one batch, then count them: host hits bound for a
        GPU with one copy per run of them (``to_device_views``), the others with
        ``copy_pairs``."""
        pairs = []
        batch: list[tuple[int, torch.Tensor]] = []
        try:
            for i, _, tier, obj in hits:
                stored = tier.resident_tensor(obj)
                assert stored is not None
                if self._batches(stored, target):
                    batch.append((i, stored))
                    continue
                out = torch.empty(
                    stored.shape, dtype=stored.dtype, device=target or tier.home_device
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
            for _, key, tier, _ in hits:
                tier.unpin(key)
        for _, key, tier, obj in hits:
            self._record_hit(key, tier, obj)

    def _read_now(
        self, found: tuple[int, Tier, Any], target: torch.device | None, out: torch.Tensor | None
    ) -> torch.Tensor | None:
        """A copy of a small host entry held in memory, made on the spot: no await, so no pin
        (nothing can evict it meanwhile); None where the read must wait."""
        if out is not None or (target is not None and target.type != "cpu"):
            return None
        stored = found[1].resident_tensor(found[2])
        if stored is None or not stored.is_cpu or stored.nbytes >= INLINE_COPY_BYTES:
            return None
        return stored.detach().clone()

    def _hit_now(
        self, key: KeyLike, found: tuple[int, Tier, Any] | None, target: torch.device | None
    ) -> torch.Tensor | None:
        """A hit served on the spot (no promotion due, and ``_read_now`` could copy it)."""
        if found is None or self._promotes(key, found):
            return None
        result = self._read_now(found, target, None)
        if result is not None:
            self._record_hit(key, found[1], found[2])
        return result

    def _promotes(self, key: KeyLike, found: tuple[int, Tier, Any]) -> bool:
        index, tier, _ = found
        return bool(index) and self.config.promote_on_hit and not tier.is_leaving(key)

    def _record_hit(self, key: KeyLike, tier: Tier, obj: Any, op: _Operation | None = None) -> None:
        tier.touch(key)
        size = tier.evictor.get_size(obj)
        tier.counters.bytes_out += size
        if op is not None:
            op.tier, op.nbytes = tier.name, size
        for admission in self._observers:  # reuse evidence for the tiers' admission policies
            admission.observe(key, size)

    async def _get(
        self,
        key: KeyLike,
        target: torch.device | None,
        out: torch.Tensor | None,
        found: tuple[int, Tier, Any] | None,
        op: _Operation | None = None,
    ) -> torch.Tensor | None:
        """``get`` from where ``_find`` found the key, looking again if it moved meanwhile;
        ``op``, a timed call, learns the tier and bytes of the hit."""
        if found is not None and found[1].lookup(key) is not found[2]:
            found = self._find(key)  # it changed while this call waited for its turn
        for attempt in range(_MAX_LOOKUPS):
            if attempt:
                found = self._find(key)
            if found is None:
                # Only a key no index held: one that was dropped just now stays a miss.
                if attempt or not self._shared:
                    return None
                return await self._fetch_shared(key, target, out, op)
            index, tier, obj = found
            result = self._read_now(found, target, out)
            if result is None:
                tier.pin(key)
                try:
                    data = await self._load_or_drop(tier, key, obj, out)
                    if data is None:
                        if tier.lookup(key) is obj:
                            return None  # an error of the environment: a miss; it stays
                        continue  # moved, replaced or lost while we read: look again
                    result = data
                    if out is None:
                        home = target or tier.home_device
                        result = await copy_to(data, home, tier.loads_are_private)
                finally:
                    tier.unpin(key)
            self._record_hit(key, tier, obj, op)
            # Unpinned first: a promotion may wait for room that only this entry's eviction
            # from its own tier would make; the move simply goes stale if that happens.
            if self._promotes(key, found):
                await self._background(self._promote(index, key, obj, result))
            return result
        return None

    async def _fetch_shared(
        self,
        key: KeyLike,
        target: torch.device | None,
        out: torch.Tensor | None,
        op: _Operation | None,
    ) -> torch.Tensor | None:
        """A key no index holds may be in a shared tier's storage (another store wrote it)."""
        if key in self._moving:
            return None  # the server may hold a stale move's value until the move removes it
        for index, tier in enumerate(self.tiers):
            if not tier.shared:
                continue
            deletes = self._deletes
            started = time.perf_counter()
            found = await tier.fetch(key)
            if found is None:
                continue
            obj, data = found
            tier.counters.fetched += 1
            tier.counters.bytes_out += data.nbytes
            self.metrics.observe_load(tier.name, time.perf_counter() - started, data.nbytes)
            if op is not None:
                op.tier, op.nbytes = tier.name, data.nbytes
            # Indexed only if no tier took the key meanwhile (a put that committed is newer)
            # and no delete ran while the value was on its way (it may have been the key's).
            adopted = (
                self._holder(key) is None
                and deletes == self._deletes
                and key not in self._moving
                and tier.try_adopt(key, obj)
            )
            if adopted:
                tier.touch(key)
            if out is not None:
                result = await copy_into(out, data)
            else:
                result = await copy_to(data, target or tier.home_device, private=True)
            if adopted and index and self.config.promote_on_hit:
                await self._background(self._promote(index, key, obj, result))
            return result
        return None

    async def contains(self, key: KeyLike) -> str | None:
        """The name of the tier holding ``key``, or None."""
        key = check_key(key)
        self._check_open()
        for tier in self.tiers:
            if tier.lookup(key) is not None:
                return tier.name
        return None

    def pin(self, key: KeyLike) -> str | None:
        """Keep ``key`` from being evicted in any tier until ``unpin``; the tier holding it.

        Nothing is pinned (and None returned) when no tier holds ``key``. Pins are counted and
        follow the entry when it is promoted or demoted.
        """
        key = check_key(key)
        self._check_open()
        for tier in self.tiers:
            if tier.lookup(key) is not None:
                for each in self.tiers:
                    each.pin(key)
                return tier.name
        return None

    def unpin(self, key: KeyLike) -> None:
        """Release one ``pin`` of ``key``."""
        key = check_key(key)
        for tier in self.tiers:
            tier.unpin(key)

    async def delete(self, key: KeyLike) -> bool:
        """Remove ``key`` from every tier; whether it was there."""
        key = check_key(key)
        async with _Operation(self):
            self._deletes += 1
            removed = self._remove_everywhere(key)
            self._positions.pop(key, None)
            for tier, obj in removed:
                await tier.discard(obj)
            await self._discarded(key)
            holders = [tier for tier, _ in removed]
            forgotten = [
                await tier.forget(key) for tier in self.tiers if tier.shared and tier not in holders
            ]
        return bool(removed) or any(forgotten)

    def stats(self) -> dict[str, Any]:
        """Per-tier counters and totals as one plain dict."""
        tiers = cascade_stats(self.tiers)
        return {
            "tiers": tiers,
            "entries": sum(t["entries"] - t["clean_copies"] for t in tiers.values()),
            "resident_bytes": sum(t["resident_bytes"] for t in tiers.values()),
            "drops": sum(t["drops"] for t in tiers.values()),
            "corrupt": sum(t["corrupt"] for t in tiers.values()),
            "pinned_entries": sum(t["pinned_entries"] for t in tiers.values()),
            "pinned_bytes": sum(t["pinned_bytes"] for t in tiers.values()),
        }

    def audit(self) -> list[str]:
        """Broken invariants as messages: accounting, budgets, and a key in two tiers."""
        quiescent = not self._active and not self._tasks
        problems = [p for tier in self.tiers for p in tier.audit(quiescent)]
        # Every copy of a key holds the authoritative entry's bytes: sizes must agree.
        first: dict[KeyLike, tuple[Tier, int]] = {}
        for tier in self.tiers:
            for key, obj in tier.cache_dict.items():
                size = tier.evictor.get_size(obj)
                if key not in first:
                    first[key] = (tier, size)
                elif first[key][1] != size:
                    holder, expected = first[key]
                    problems.append(
                        f"{key!r}: the copy in {tier.name} has {size} bytes, "
                        f"the entry in {holder.name} {expected}"
                    )
        return problems

    # ------------------------------------------------------------------ moving entries
    async def _place(
        self,
        key: KeyLike,
        data: torch.Tensor,
        candidates: Sequence[Tier],
        source: tuple[Tier, Any] | None,
        arrival: str = "puts",
        wait: bool = True,
        ticket: int = 0,
    ) -> _Outcome:
        """Write ``data`` into the first candidate that takes it and commit it there.

        With a ``source`` this is a move: it commits only if the source still holds that
        object, and removes it in the same step.  Without one it is a put, replacing ``key``
        wherever it is.  When every candidate refuses only because its entries are in use or
        in flight, it waits (``wait``) for one of them to change, up to the room timeout.
        A tier's admission policy is asked once per call, when the search first reaches it;
        its refusal is final and never waited out.
        """
        size = data.nbytes
        could_fit = [tier for tier in candidates if size <= tier.budget]
        admitted: dict[Tier, bool] = {}
        failed: set[Tier] = set()  # tiers whose write failed: not retried by this placement
        waited = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.room_timeout_s
        while True:
            if source is not None and not self._still_current(key, source):
                return _Outcome.STALE
            tiers = [tier for tier in could_fit if tier not in failed and tier.reachable]
            seen = {tier: tier.changes for tier in tiers}
            outcome = await self._place_once(
                key, data, size, tiers, source, arrival, admitted, ticket
            )
            if outcome.outcome is not _Outcome.REFUSED and outcome.outcome is not _Outcome.FAILED:
                return outcome.outcome
            failed.update(outcome.failed)
            # Only a refusal because entries are in use or in flight is worth waiting out; a
            # tier that failed or is unreachable is skipped, never the reason to give up.
            remaining = deadline - loop.time()
            if not wait or not outcome.full or remaining <= 0:
                if waited and outcome.full:
                    self._note_room_timeout(key, size, outcome.full)
                return outcome.outcome
            # A tier that changed while this pass awaited a later one is tried again at once.
            if all(tier.changes == seen[tier] for tier in outcome.full):
                changes = [tier.changed() for tier in outcome.full]
                await asyncio.wait(changes, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                waited = True

    async def _place_once(
        self,
        key: KeyLike,
        data: torch.Tensor,
        size: int,
        candidates: Sequence[Tier],
        source: tuple[Tier, Any] | None,
        arrival: str,
        admitted: dict[Tier, bool],
        ticket: int,
    ) -> _Attempt:
        attempt = _Attempt(_Outcome.REFUSED)
        for tier in candidates:
            if tier not in admitted:  # asking records the offer, so only once per placement
                admitted[tier] = tier.admits(key, size)
            if not admitted[tier]:
                continue
            if source is None:
                if self._newest_put.get(key, 0) > ticket:
                    return _Attempt(_Outcome.PLACED)  # a later put's value is in already
                replaced_here = tier.make_way(key, size)
                if replaced_here is not None:
                    self._notify_drop(key)  # reported only if this put then fails
                    await tier.discard(replaced_here)
            victims = tier.admit(key, size, self._positions.get(key))
            if victims is None:
                attempt.full.append(tier)
                continue
            try:
                await self._make_room(tier, victims, size)
            except TimeoutError:
                tier.cancel(key, size)
                attempt.full.append(tier)
                self._note_room_timeout(key, size, [tier])
                continue
            try:
                obj = await tier.write(key, data)
            except Exception as exc:
                tier.unreserve(key, size)
                self._count_failure(tier, f"could not write {key!r}", exc)
                attempt.fail(tier)
                continue
            # From the currency check to the commit nothing awaits: a delete or put of the key
            # comes wholly before (the move goes stale) or wholly after.
            if source is not None and not self._still_current(key, source, tier):
                tier.unreserve(key, size)
                await tier.discard(obj)
                return _Attempt(_Outcome.STALE)
            if source is None and self._newest_put.get(key, 0) > ticket:
                tier.unreserve(key, size)  # a later put's value is in: this one came before it
                await tier.discard(obj)
                return _Attempt(_Outcome.PLACED)
            try:
                tier.publish(obj)
            except OSError as exc:
                tier.unreserve(key, size)
                self._count_failure(tier, f"could not publish {key!r}", exc)
                await tier.discard(obj)
                attempt.fail(tier)
                continue
            replaced: list[tuple[Tier, Any]] = []
            if source is None:
                replaced = self._remove_everywhere(key)
                self._newest_put[key] = ticket
            elif arrival not in _KEEPS_SOURCE or not self.config.clean_copies:
                source[0].remove(key)
                replaced = [source]
            tier.commit(key, obj, size)
            tier.counters.count(arrival)
            if self.config.write_ahead:
                self._write_ahead(tier, size)
            for old_tier, old_obj in replaced:  # (a promotion's source stays: a clean copy)
                await old_tier.discard(old_obj)
            await tier.make_durable(obj)
            return _Attempt(_Outcome.PLACED)
        return attempt

    def _count_failure(self, tier: Tier, what: str, exc: Exception) -> None:
        tier.counters.errors += 1
        errors = tier.counters.errors
        # The tier logged an outage once; a full disk fails every write: log the 1st, 2nd,
        # 4th, 8th... failure, with the count.
        if not isinstance(exc, TierUnavailableError) and errors & (errors - 1) == 0:
            log.warning("tier %r %s: %s (its error %d)", tier.name, what, exc, errors)

    def _note_room_timeout(self, key: KeyLike, size: int, full: Sequence[Tier]) -> None:
        """A put or move waited ``room_timeout_s`` for room in vain: count it, say what held it."""
        for tier in full:
            tier.counters.room_timeouts += 1
        log.warning(
            "%r (%d bytes) found no room within %.1f s: %s",
            key,
            size,
            self.config.room_timeout_s,
            "; ".join(tier.describe_room() for tier in full),
        )

    def _begin_put(self, key: KeyLike) -> int:
        """Count a put of ``key`` in flight; its ticket (puts are numbered as called)."""
        self._putting[key] += 1
        self._tickets += 1
        return self._tickets

    def _end_put(self, key: KeyLike) -> None:
        self._putting[key] -= 1
        if not self._putting[key]:
            del self._putting[key]
            self._newest_put.pop(key, None)
            if key in self._drops_held:
                self._drops_held.discard(key)
                if self._holder(key) is None:
                    self._notify_drop(key)

    async def _put(self, key: KeyLike, tensor: torch.Tensor, ticket: int = 0) -> _Outcome:
        """Place a put; ``ticket`` from ``_begin_put`` if the caller began it, else 0."""
        if not ticket:
            ticket = self._begin_put(key)
        try:
            outcome = await self._place(key, tensor, self.tiers, None, ticket=ticket)
        finally:
            self._end_put(key)
        await self._discarded(key)
        return outcome

    async def _make_room(self, tier: Tier, victims: list[tuple[KeyLike, Any]], size: int) -> None:
        """Move the victims down, then reserve ``size`` bytes in ``tier``, within the room timeout.

        The victims' moves run on as their own task if the timeout passes first, so an entry
        is never left half moved.
        """
        timeout = self.config.room_timeout_s
        if victims:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            await asyncio.wait(
                {self._background_nowait(self._demote(tier, victims))}, timeout=timeout
            )
            timeout = max(0.0, deadline - loop.time())
        await tier.reserve(size, timeout)

    async def _demote(self, tier: Tier, victims: list[tuple[KeyLike, Any]]) -> None:
        below = self.tiers[self.tiers.index(tier) + 1 :]
        staged = await self._stage_victims(tier, below, victims)
        try:
            await asyncio.gather(
                *(
                    self._demote_one(tier, below, key, obj, view)
                    for (key, obj), view in zip(victims, staged, strict=True)
                )
            )
        finally:
            for view in staged:
                if view is not None:
                    below[0].release_staged(view)
        # The caller's list is the last reference to the moved objects: without it a memory
        # tier can reuse their buffers for the write that waited for this room.
        staged.clear()
        victims.clear()

    async def _stage_victims(
        self, tier: Tier, below: Sequence[Tier], victims: Sequence[tuple[KeyLike, Any]]
    ) -> list[torch.Tensor | None]:
        """The victims leaving a GPU tier that will need a write below, staged into the tier
        below as one batch (one gather and one copy); None for the others."""
        staged: list[torch.Tensor | None] = [None] * len(victims)
        if not below or tier.home_device.type not in self._stage_from or len(victims) < 2:
            return staged
        chosen: list[int] = []
        tensors: list[torch.Tensor] = []
        for i, (key, obj) in enumerate(victims):
            if (
                tier.lookup(key) is obj
                and self._holder(key) is tier
                and below[0].lookup(key) is None
                and self._clean_copy_below(key, below) is None
                and key not in self._writing_ahead
            ):
                resident = tier.resident_tensor(obj)
                if resident is not None:
                    chosen.append(i)
                    tensors.append(resident)
        if len(chosen) < 2:
            return staged
        views = await self._stage(below[0], tensors)
        for i, view in zip(chosen, views, strict=True):
            staged[i] = view
        return staged

    def _write_ahead(self, tier: Tier, size: int) -> None:
        """Start copying down, as clean copies, the entries that the next puts of ``size``
        bytes into ``tier`` would evict: their demotions then hand over and write nothing,
        while a put waits only for what is not copied yet.  Memory tiers whose evictor can
        name its next victims (``BaseEvictor.next_victims``), above a tier that admits all."""
        index = self.tiers.index(tier)
        if index + 1 == len(self.tiers):
            return
        into, below = self.tiers[index + 1], self.tiers[index + 1 :]
        if not isinstance(into.admission, AdmitAll):
            return  # a copy's offer would count as the key's first: admission sees it once
        for key in tier.evictor.next_victims(tier.cache_dict, WRITE_AHEAD_PUTS * size):
            if len(self._writing_ahead) >= MAX_WRITES_AHEAD:
                return
            obj = tier.lookup(key)
            data = tier.resident_tensor(obj)
            if (
                data is None
                or key in self._writing_ahead
                or key in self._moving
                or tier.is_leaving(key)
                or self._holder(key) is not tier
                or any(each.lookup(key) is not None for each in below)
            ):
                continue
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._writing_ahead[key] = done
            self._background_nowait(self._copy_ahead(tier, into, key, obj, data, done))

    async def _copy_ahead(
        self,
        tier: Tier,
        into: Tier,
        key: KeyLike,
        obj: Any,
        data: torch.Tensor,
        done: asyncio.Future[None],
    ) -> None:
        """Copy ``key``'s entry from ``tier`` into ``into`` and keep it above: a clean copy,
        committed only while the entry above is still the key's authoritative one."""
        self._moving[key] += 1
        try:
            await self._place(key, data, [into], (tier, obj), "written_ahead", wait=False)
        finally:
            self._unmoving(key)
            del self._writing_ahead[key]
            done.set_result(None)

    async def _demote_one(
        self,
        tier: Tier,
        below: list[Tier],
        key: KeyLike,
        obj: Any,
        staged: torch.Tensor | None = None,
    ) -> None:
        """Move one victim down (``staged``: its bytes, already copied to the tier below)."""
        copying = self._writing_ahead.get(key)
        if copying is not None:
            await copying  # its copy below takes over once committed: no second write
        if tier.lookup(key) is not obj:
            return  # deleted or replaced since it was chosen
        is_copy = self._holder(key) is not tier
        if is_copy or self._clean_copy_below(key, below) is not None:
            # A clean copy leaves without a move (the key stays above); an entry with a clean
            # copy below hands over to it: neither writes a byte.
            tier.remove(key)
            if is_copy:
                tier.counters.copies_evicted += 1
            else:
                tier.counters.demotions_out += 1
                tier.counters.unwritten_demotions += 1
            await self._release(tier, key, obj)
            return
        outcome = _Outcome.REFUSED
        # A tier whose copy is leaving too cannot take the key again: its own move settles it.
        candidates = [each for each in below if each.lookup(key) is None]
        if candidates:
            data = staged if staged is not None else await self._load_or_drop(tier, key, obj)
            if data is not None:
                self._moving[key] += 1
                try:
                    outcome = await self._place(key, data, candidates, (tier, obj), "demotions_in")
                finally:
                    self._unmoving(key)
            # Unreadable for now (an error of the environment): evicted all the same, as the
            # put waiting for its room would otherwise wait in vain.
        if outcome is _Outcome.PLACED:
            tier.counters.demotions_out += 1
            tier.counters.bytes_out += tier.evictor.get_size(obj)
            return
        if tier.lookup(key) is not obj:
            return  # deleted or replaced meanwhile
        tier.remove(key)
        holder = self._holder(key)
        if holder is not None and holder not in below:
            tier.counters.copies_evicted += 1  # a promotion above committed while it moved
        else:
            tier.counters.drops += 1
            if holder is None:  # else the copy leaving below reports its own drop
                self._notify_drop(key)
        await self._release(tier, key, obj)

    async def _release(self, tier: Tier, key: KeyLike, obj: Any) -> None:
        """Release an evicted entry's storage: at once, or in the background where the tier
        allows (``Tier.discards_behind``), and then the key's next put or delete waits."""
        behind = sum(map(len, self._discarding.values()))  # at most MAX_DISCARDS_BEHIND
        if not tier.discards_behind or behind >= MAX_DISCARDS_BEHIND:
            await tier.discard(obj)
            return
        task = self._background_nowait(tier.discard(obj))
        self._discarding.setdefault(key, set()).add(task)
        task.add_done_callback(functools.partial(self._forget_discard, key))

    def _forget_discard(self, key: KeyLike, task: asyncio.Task[None]) -> None:
        pending = self._discarding[key]
        pending.discard(task)
        if not pending:
            del self._discarding[key]

    async def _discarded(self, key: KeyLike) -> None:
        """Wait until no released storage of ``key`` is still being removed."""
        while key in self._discarding:
            await asyncio.wait(self._discarding[key])

    async def _promote(self, index: int, key: KeyLike, obj: Any, data: torch.Tensor) -> None:
        tier = self.tiers[index]
        self._moving[key] += 1
        try:
            outcome = await self._place(
                key, data, self.tiers[:index], (tier, obj), "promotions_in", wait=False
            )
        finally:
            self._unmoving(key)
        if outcome is _Outcome.PLACED:
            tier.counters.promotions_out += 1

    # ------------------------------------------------------------------ helpers
    def _find(self, key: KeyLike) -> tuple[int, Tier, Any] | None:
        for index, tier in enumerate(self.tiers):
            obj = tier.lookup(key)
            if obj is not None:
                return index, tier, obj
            tier.counters.misses += 1
        return None

    def _still_current(
        self, key: KeyLike, source: tuple[Tier, Any], into: Tier | None = None
    ) -> bool:
        """Whether a move of ``key`` from ``source`` may still commit (into ``into``): the source
        still holds that object as the key's authoritative entry, and the destination no copy."""
        tier, obj = source
        if tier.lookup(key) is not obj or self._holder(key) is not tier:
            return False
        return into is None or into.lookup(key) is None

    def _clean_copy_below(self, key: KeyLike, below: Sequence[Tier]) -> Tier | None:
        """A tier below holding a clean copy of ``key`` that is staying (not itself a victim)."""
        return next((t for t in below if t.lookup(key) is not None and not t.is_leaving(key)), None)

    def _unmoving(self, key: KeyLike) -> None:
        self._moving[key] -= 1
        if not self._moving[key]:
            del self._moving[key]

    def _holder(self, key: KeyLike) -> Tier | None:
        """The tier of ``key``'s authoritative entry (the highest holding it), or None."""
        for tier in self.tiers:  # a plain loop: this runs on every put and move
            if tier.lookup(key) is not None:
                return tier
        return None

    def _remove_everywhere(self, key: KeyLike) -> list[tuple[Tier, Any]]:
        removed = []
        for tier in self.tiers:
            obj = tier.remove(key)
            if obj is not None:
                removed.append((tier, obj))
        return removed

    async def _load_or_drop(
        self, tier: Tier, key: KeyLike, obj: Any, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``tier.load(obj)`` (into ``out`` if given), or None: a miss.

        Only evidence that the stored bytes are wrong (``CorruptEntryError``) or gone (the
        tier answers None) drops the entry.  An error of the environment (out of file
        descriptors or memory, an I/O error, a server down) is counted and leaves the entry
        where it is, to be read again later.
        """
        timed = tier.name in self.metrics.timed_loads  # reads of storage, not of memory tiers
        started = time.perf_counter() if timed else 0.0
        try:
            data = await (tier.load(obj) if out is None else tier.load_into(obj, out))
        except CorruptEntryError as exc:
            if out is not None:  # it may hold the bad bytes: never leave them to the caller
                out.zero_()
            self._drop_bad(tier, key, obj, str(exc), "corrupt")
            return None
        except StorageError:
            return None  # a tier that names its own failures (a server down) counted them
        except OSError as exc:
            tier.counters.errors += 1
            errors = tier.counters.errors
            if errors & (errors - 1) == 0:  # the 1st, 2nd, 4th, 8th...: a storm logs little
                log.warning(
                    "tier %r could not read %r (its error %d): %s", tier.name, key, errors, exc
                )
            return None
        if data is None:
            self._drop_bad(tier, key, obj, "its storage vanished", "errors")
        elif timed:
            self.metrics.observe_load(tier.name, time.perf_counter() - started, data.nbytes)
        return data

    def _drop_bad(self, tier: Tier, key: KeyLike, obj: Any, why: str, counter: str) -> None:
        """Drop an entry whose stored bytes cannot be served (if the tier still holds it)."""
        if tier.lookup(key) is not obj:
            return  # it moved or was replaced meanwhile: nothing is wrong
        log.warning("tier %r dropped %r: %s", tier.name, key, why)
        tier.remove(key)
        tier.counters.count(counter)
        self._notify_drop(key)
        self._background_nowait(tier.discard(obj))

    def _notify_drop(self, key: KeyLike) -> None:
        if key in self._putting:  # a new value is landing: the key may not be gone at all
            self._drops_held.add(key)
            return
        self._positions.pop(key, None)
        if self._on_drop is not None:
            try:
                self._on_drop(key)
            except Exception:
                log.exception("on_drop callback failed for %r", key)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")

    async def _background(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` to completion even if the caller is cancelled: moves never stop halfway."""
        # As asyncio.shield, but the task answers the caller itself as it ends, which saves
        # the event-loop turn a done callback costs (a tenth of a small put).
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._background_nowait(_answering(work, answer))
        return await answer

    def _background_nowait(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
        return self._idle


async def _answering(work: Coroutine[Any, Any, T], answer: asyncio.Future[T]) -> None:
    """Run ``work`` and hand its outcome to ``answer``, unless its waiter gave up on it."""
    try:
        result = await work
    except asyncio.CancelledError:
        answer.cancel()
        raise
    except Exception as exc:
        if answer.done():
            log.warning("work whose caller was cancelled failed", exc_info=exc)
        else:
            answer.set_exception(exc)
    else:
        if not answer.done():
            answer.set_result(result)


class _Operation:
    """Counts a public call in flight so that ``close`` can wait for it.

    With ``histograms`` (the metrics' puts or gets, by tier) the call is timed: one that returns
    is observed under ``tier`` with ``nbytes``, which the call sets once it knows them (tier
    None: no tier took the put, or the get missed).
    """

    __slots__ = ("histograms", "nbytes", "started", "store", "tier")

    def __init__(
        self,
        store: TieredStore,
        histograms: Mapping[str | None, OperationHistograms] | None = None,
        nbytes: int = 0,
    ) -> None:
        self.store = store
        self.histograms = histograms
        self.nbytes = nbytes
        self.tier: str | None = None
        self.started = time.perf_counter() if histograms is not None else 0.0

    async def __aenter__(self) -> _Operation:
        store = self.store
        store._check_open()
        if store._opened is None or not store._opened.done():
            await store.open()
        store._active += 1
        store._idle_event().clear()
        return self

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        store = self.store
        store._active -= 1
        if not store._active:
            store._idle_event().set()
        if self.histograms is not None and exc_type is None:
            self.histograms[self.tier].observe(time.perf_counter() - self.started, self.nbytes)


def _as_device(device: str | torch.device | None) -> torch.device | None:
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
