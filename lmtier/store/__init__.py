"""TieredStore: the cascade of tiers, with demotion, promotion and per-entry moves.

The store is a facade over small parts, each in its own module::

    cascade.py    the tiers as one index; a lookup's ``Hit``
    ledger.py     per-key state in flight; every removal of a key's older bytes
    placement.py  writing an entry into the first tier that takes it
    mover.py      puts, demotion, promotion, write-ahead
    loading.py    reading an entry's bytes; dropping wrong ones
    reads.py      get, get_many, get_into_many, fetches from shared storage
    tasks.py      background work and the calls in flight
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmtier import serde
from lmtier.config import StoreConfig, config_from_mapping, load_config
from lmtier.errors import InvalidValueError, LmtierTypeError, StoreClosedError
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike, check_key
from lmtier.monitoring import StoreMetrics
from lmtier.store.cascade import Cascade, Hit
from lmtier.store.ledger import MAX_DISCARDS_BEHIND, KeyLedger
from lmtier.store.loading import Loader
from lmtier.store.mover import MAX_WRITES_AHEAD, WRITE_AHEAD_PUTS, Mover
from lmtier.store.placement import Outcome
from lmtier.store.reads import Reader, as_device
from lmtier.store.tasks import Background, Operation
from lmtier.tiers.base import Arrival, Tier, cascade_stats
from lmtier.tiers.factory import build_tiers

__all__ = [
    "MAX_DISCARDS_BEHIND",
    "MAX_WRITES_AHEAD",
    "WRITE_AHEAD_PUTS",
    "Arrival",
    "Hit",
    "TierInfo",
    "TieredStore",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierInfo:
    """One tier as an adapter or a report sees it: what it is and what it counted so far."""

    name: str
    kind: str  # the tier's class, e.g. "MemoryTier"
    budget: int
    resident_bytes: int
    shared: bool
    admission: str
    available: bool  # False while its storage is known to be down
    counters: Mapping[str, int]


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
        self._cascade = Cascade(self.tiers)
        self._background = Background()
        self._ledger = KeyLedger(
            self._background.spawn, lambda key: self._cascade.holder(key) is not None, on_drop
        )
        loader = Loader(self.metrics, self._ledger)
        self._mover = Mover(config, self._cascade, self._ledger, self._background, loader)
        self._reader = Reader(
            self._cascade,
            self._ledger,
            loader,
            self.metrics,
            self._background,
            self._mover.promote,
            config.promote_on_hit,
        )
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

    # ------------------------------------------------------------------ life cycle
    @property
    def background(self) -> Background:
        """The store's background tasks and calls in flight."""
        return self._background

    @property
    def ready(self) -> bool:
        """Whether the tiers are open."""
        return self._opened is not None and self._opened.done()

    def check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")

    async def open(self) -> None:
        """Prepare every tier's storage; the first operation does it if nobody did."""
        self.check_open()
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
        await self._background.drain()
        if self._opened is not None:
            await asyncio.gather(self._opened, return_exceptions=True)
            for tier in self.tiers:
                await tier.close()
        await self.metrics.stop()

    async def release_now(self, timeout_s: float) -> None:
        """Release the tiers and the metrics server without finishing in-flight work, each
        within ``timeout_s`` (for a close that ran out of time); later closes do nothing."""
        self._closed = True
        for what, closing in [
            *((f"tier {tier.name!r}", tier.close()) for tier in self.tiers),
            ("the metrics server", self.metrics.stop()),
        ]:
            try:
                await asyncio.wait_for(closing, timeout_s)
            except Exception:  # TimeoutError included: the next release still runs
                log.exception("lmtier store: releasing %s failed", what)

    async def settle(self) -> None:
        """Wait until no call is in flight and no move or release runs in the background."""
        await self._background.drain()

    @property
    def metrics_port(self) -> int | None:
        """The port of the metrics HTTP server while it serves (the one chosen for port 0)."""
        return self.metrics.port

    @property
    def on_drop(self) -> Callable[[KeyLike], None] | None:
        """Called with each key that left the store for good (the last tier dropped it)."""
        return self._ledger.on_drop

    @on_drop.setter
    def on_drop(self, callback: Callable[[KeyLike], None] | None) -> None:
        self._ledger.on_drop = callback

    # ------------------------------------------------------------------ writes
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
            self._ledger.positions[key] = position
        async with Operation(self, self.metrics.puts, tensor.nbytes) as op:
            outcome = await self._background.run(self._mover.put(key, tensor))
            if outcome is Outcome.PLACED and op.histograms is not None:
                holder = self._cascade.holder(key)
                op.tier = None if holder is None else holder.name
        return PutStatus.LEGAL if outcome is Outcome.PLACED else PutStatus.ILLEGAL

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
                self._ledger.positions[key] = position
        async with Operation(self):  # one call in flight and one background task per batch
            done = await self._background.run(self._mover.put_all(last))
        placed = {key: outcome is Outcome.PLACED for key, outcome in zip(last, done, strict=True)}
        return [PutStatus.LEGAL if placed[key] else PutStatus.ILLEGAL for key, _ in items]

    async def delete(self, key: KeyLike) -> bool:
        """Remove ``key`` from every tier; whether it was there."""
        key = check_key(key)
        ledger = self._ledger
        async with Operation(self):
            ledger.begin_delete()
            removed = self._cascade.remove_everywhere(key)
            ledger.positions.pop(key, None)
            for tier, obj in removed:
                await ledger.discard(tier, key, obj)
            await ledger.discarded(key)
            holders = [tier for tier, _ in removed]
            forgotten = [
                await tier.forget(key) for tier in self.tiers if tier.shared and tier not in holders
            ]
        return bool(removed) or any(forgotten)

    # ------------------------------------------------------------------ reads
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
        target = as_device(device)
        if out is not None:
            serde.check_storable(out)
            if out.requires_grad:
                raise InvalidValueError("out requires grad: pass a tensor without autograd")
        async with Operation(self, self.metrics.gets) as op:
            return await self._reader.get(key, target, out, self._cascade.find(key), op)

    async def get_many(
        self, keys: Sequence[KeyLike], device: str | torch.device | None = None
    ) -> list[torch.Tensor | None]:
        """``get`` for each key, as one call: small host hits are served on the spot, the
        other keys' reads run concurrently.  Every key is looked up before any promotion, so
        a key given twice is found where it was when the call began."""
        keys = [check_key(key) for key in keys]
        target = as_device(device)
        async with Operation(self):
            return await self._reader.get_many(keys, target)

    async def get_into_many(
        self, keys: Sequence[KeyLike], outs: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        """``get(key, out=out)`` for each pair, as one call; None where an entry is missing or
        no longer of its ``out``'s shape and dtype (replaced meanwhile: look again)."""
        keys = [check_key(key) for key in keys]
        if len(outs) != len(keys):
            raise InvalidValueError(f"get_into_many: {len(keys)} keys, {len(outs)} outs")
        for out in outs:
            if serde.check_storable(out).requires_grad:
                raise InvalidValueError("out requires grad: pass a tensor without autograd")
        async with Operation(self):
            return await self._reader.get_into_many(keys, outs, self._get_into)

    async def _get_into(self, key: KeyLike, out: torch.Tensor) -> torch.Tensor | None:
        try:
            return await self.get(key, out=out)
        except InvalidValueError:
            return None  # replaced by an entry of another layout

    async def contains(self, key: KeyLike) -> str | None:
        """The name of the tier holding ``key``, or None."""
        key = check_key(key)
        self.check_open()
        return self.holder(key)

    def holder(self, key: KeyLike) -> str | None:
        """The name of the tier holding ``key``'s authoritative entry, or None: an index
        lookup, no I/O (a shared tier's storage beyond the index is not asked)."""
        tier = self._cascade.holder(key)
        return None if tier is None else tier.name

    def layout(self, key: KeyLike) -> tuple[torch.dtype, tuple[int, ...]] | None:
        """The dtype and shape of ``key``'s entry as its tier's index records them, or None (no
        tier holds it, or its index does not record them): an index lookup, no I/O."""
        tier = self._cascade.holder(key)
        obj = None if tier is None else tier.lookup(key)
        if tier is None or obj is None:
            return None
        resident = tier.resident_tensor(obj)
        if resident is not None:
            return resident.dtype, tuple(resident.shape)
        dtype, shape = getattr(obj, "dtype", None), getattr(obj, "shape", None)
        if isinstance(dtype, torch.dtype) and isinstance(shape, tuple):
            return dtype, shape
        return None

    def keys(self) -> list[KeyLike]:
        """Every key the tiers' indexes hold, each once."""
        return self._cascade.keys()

    async def clear_shared(self) -> int:
        """Delete every value of this store's names on its shared tiers, whoever stored it
        (other instances of the namespace too); how many.  The index is left as it is."""
        self.check_open()
        return sum([await tier.clear_prefix() for tier in self.tiers if tier.shared])

    def touch(self, key: KeyLike) -> str | None:
        """Count a hit on ``key`` without reading it, as a get's hit counts (the tier's
        counters and evictor, the admission policies' evidence); the tier, or None."""
        key = check_key(key)
        hit = self._cascade.find(key)
        if hit is None:
            return None
        self._reader.record_hit(key, hit)
        return hit.tier.name

    def pin(self, key: KeyLike) -> str | None:
        """Keep ``key`` from being evicted in any tier until ``unpin``; the tier holding it.

        Nothing is pinned (and None returned) when no tier holds ``key``. Pins are counted and
        follow the entry when it is promoted or demoted.
        """
        key = check_key(key)
        self.check_open()
        holder = self.holder(key)
        if holder is not None:
            for tier in self.tiers:
                tier.pin(key)
        return holder

    def unpin(self, key: KeyLike) -> None:
        """Release one ``pin`` of ``key``."""
        key = check_key(key)
        for tier in self.tiers:
            tier.unpin(key)

    # ------------------------------------------------------------------ observation
    def tier_infos(self) -> list[TierInfo]:
        """Each tier, top first: its name, kind, budget, use and counters."""
        return [
            TierInfo(
                name=tier.name,
                kind=type(tier).__name__,
                budget=tier.budget,
                resident_bytes=tier.resident_bytes,
                shared=tier.shared,
                admission=tier.admission.name,
                available=tier.available,
                counters=dict(vars(tier.counters)),
            )
            for tier in self.tiers
        ]

    def tier_stats(self) -> dict[str, dict[str, Any]]:
        """Each tier's ``stats()`` by name, with its clean copies counted."""
        return cascade_stats(self.tiers)

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
        quiescent = self._background.quiescent
        problems = [p for tier in self.tiers for p in tier.audit(quiescent)]
        # Every copy of a key holds the authoritative entry's bytes: sizes must agree.
        return problems + self._cascade.audit_copies()
