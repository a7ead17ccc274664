"""The mover: puts, and entries moving between tiers (demotion, promotion, write-ahead)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lmtier.admission import AdmitAll
from lmtier.config import StoreConfig
from lmtier.keys import KeyLike
from lmtier.store.cascade import Cascade, Hit
from lmtier.store.ledger import KeyLedger
from lmtier.store.loading import Loader
from lmtier.store.placement import Outcome, Placement
from lmtier.store.tasks import Background
from lmtier.tiers.base import Arrival, Tier
from lmtier.tiers.placing import Slot

__all__ = ["MAX_WRITES_AHEAD", "WRITE_AHEAD_PUTS", "Mover"]

log = logging.getLogger("lmtier.store")

#: With ``write_ahead``, a commit into a memory tier copies down the entries that this many
#: more puts of its size would evict, at most ``MAX_WRITES_AHEAD`` copies at a time.
WRITE_AHEAD_PUTS = 4
MAX_WRITES_AHEAD = 8


class Mover:
    """Places puts, and moves entries down (demotion, write-ahead) and up (promotion).

    Demoting a victim that has a clean copy below writes nothing: the copy takes over.  A clean
    copy chosen as a victim is dropped without a move (the key stays above).  The last tier's
    victims are dropped, counted, and reported to the ledger.
    """

    #: Devices whose tensors a batch (put_many, the victims of one eviction) stages into a
    #: host tier as one copy.
    stage_from: frozenset[str] = frozenset({"cuda"})

    def __init__(
        self,
        config: StoreConfig,
        cascade: Cascade,
        ledger: KeyLedger,
        background: Background,
        loader: Loader,
    ) -> None:
        self._config = config
        self._cascade = cascade
        self._ledger = ledger
        self._background = background
        self._loader = loader
        self.placement = Placement(config, cascade, ledger, self._make_room, self._committed)

    # ------------------------------------------------------------------ puts
    async def put(self, key: KeyLike, tensor: torch.Tensor, ticket: int = 0) -> Outcome:
        """Place a put; ``ticket`` from ``KeyLedger.begin_put`` if the caller began it, else 0."""
        ledger = self._ledger
        if not ticket:
            ticket = ledger.begin_put(key)
        try:
            outcome = await self.placement.place(
                key, tensor, self._cascade.tiers, None, ticket=ticket
            )
        finally:
            ledger.end_put(key)
        await ledger.discarded(key)
        return outcome

    async def put_all(self, items: Mapping[KeyLike, torch.Tensor]) -> list[Outcome]:
        """``put`` each item concurrently, GPU tensors staged into the top tier as one batch."""
        # Numbered first, as called: staging awaits, and a put called meanwhile is newer.
        tickets = [self._ledger.begin_put(key) for key in items]
        tier = self._cascade.tiers[0]
        try:
            staged = await self.stage(tier, list(items.values()))
        except BaseException:
            for key in items:
                self._ledger.end_put(key)
            raise
        try:
            return await asyncio.gather(
                *(
                    self.put(key, tensor if view is None else view, ticket)
                    for (key, tensor), view, ticket in zip(
                        items.items(), staged, tickets, strict=True
                    )
                )
            )
        finally:
            for view in staged:
                if view is not None:
                    tier.release_staged(view)

    async def stage(self, tier: Tier, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Host copies of the GPU tensors of a batch, made by ``tier`` as one batch (None for
        each tensor it did not stage); its placements then read or adopt them."""
        chosen = [i for i, t in enumerate(tensors) if t.device.type in self.stage_from and t.nbytes]
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

    # ------------------------------------------------------------------ demotion
    async def _make_room(self, slot: Slot) -> None:
        """Move a slot's victims down, then reserve its bytes, within the room timeout.

        The victims' moves run on as their own task if the timeout passes first, so an entry
        is never left half moved.
        """
        timeout = self._config.room_timeout_s
        if slot.victims:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            await asyncio.wait(
                {self._background.spawn(self._demote(slot.tier, slot.victims))}, timeout=timeout
            )
            timeout = max(0.0, deadline - loop.time())
        await slot.reserve(timeout)

    async def _demote(self, tier: Tier, victims: list[tuple[KeyLike, Any]]) -> None:
        below = self._cascade.below(tier)
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
        if not below or tier.home_device.type not in self.stage_from or len(victims) < 2:
            return staged
        chosen: list[int] = []
        tensors: list[torch.Tensor] = []
        for i, (key, obj) in enumerate(victims):
            if (
                tier.lookup(key) is obj
                and self._cascade.holder(key) is tier
                and below[0].lookup(key) is None
                and self._cascade.clean_copy_below(key, below) is None
                and key not in self._ledger.writing_ahead
            ):
                resident = tier.resident_tensor(obj)
                if resident is not None:
                    chosen.append(i)
                    tensors.append(resident)
        if len(chosen) < 2:
            return staged
        views = await self.stage(below[0], tensors)
        for i, view in zip(chosen, views, strict=True):
            staged[i] = view
        return staged

    async def _demote_one(
        self,
        tier: Tier,
        below: list[Tier],
        key: KeyLike,
        obj: Any,
        staged: torch.Tensor | None = None,
    ) -> None:
        """Move one victim down (``staged``: its bytes, already copied to the tier below)."""
        ledger, cascade = self._ledger, self._cascade
        copying = ledger.writing_ahead.get(key)
        if copying is not None:
            await copying  # its copy below takes over once committed: no second write
        if tier.lookup(key) is not obj:
            return  # deleted or replaced since it was chosen
        is_copy = cascade.holder(key) is not tier
        if is_copy or cascade.clean_copy_below(key, below) is not None:
            # A clean copy leaves without a move (the key stays above); an entry with a clean
            # copy below hands over to it: neither writes a byte.
            tier.remove(key)
            if is_copy:
                tier.record_copy_evicted()
            else:
                tier.record_handed_over()
            await ledger.release(tier, key, obj)
            return
        outcome = Outcome.REFUSED
        # A tier whose copy of the key is leaving too takes the key once that copy is gone (a
        # copy leaves without a move); dropping the victim instead would lose the key.
        await self._leaving_copies_gone(key, below)
        if tier.lookup(key) is not obj:
            return  # deleted or replaced meanwhile
        candidates = [each for each in below if each.lookup(key) is None]
        if candidates:
            data = staged if staged is not None else await self._loader.load_or_drop(tier, key, obj)
            if data is not None:
                with ledger.move(key, candidates):
                    outcome = await self.placement.place(
                        key, data, candidates, cascade.source(tier, obj), Arrival.DEMOTION
                    )
            # Unreadable for now (an error of the environment): evicted all the same, as the
            # put waiting for its room would otherwise wait in vain.
        if outcome is Outcome.PLACED:
            tier.record_demoted(obj)
            return
        if tier.lookup(key) is not obj:
            return  # deleted or replaced meanwhile
        tier.remove(key)
        holder = cascade.holder(key)
        if holder is not None and holder not in below:
            tier.record_copy_evicted()  # a promotion above committed while it moved
        else:
            tier.record_drop()
            if holder is None:  # else the copy leaving below reports its own drop
                ledger.notify_drop(key)
        await ledger.release(tier, key, obj)

    async def _leaving_copies_gone(self, key: KeyLike, below: Sequence[Tier]) -> None:
        """Wait, up to the room timeout, until no tier below holds a copy of ``key`` that is
        itself a victim leaving."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.room_timeout_s
        while True:
            leaving = [t for t in below if t.lookup(key) is not None and t.is_leaving(key)]
            remaining = deadline - loop.time()
            if not leaving or remaining <= 0:
                return
            changes = [t.changed() for t in leaving]
            await asyncio.wait(changes, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)

    # ------------------------------------------------------------------ promotion
    async def promote(self, key: KeyLike, source: Hit, data: torch.Tensor) -> None:
        """Copy a hit in a lower tier (``data``: its bytes) to the top; its source stays as a
        clean copy where the config keeps them."""
        above = self._cascade.tiers[: source.index]
        with self._ledger.move(key, above):
            outcome = await self.placement.place(
                key,
                data,
                above,
                source,
                Arrival.PROMOTION,
                wait=False,
            )
        if outcome is Outcome.PLACED:
            source.tier.record_promoted()

    # ------------------------------------------------------------------ write-ahead
    def _committed(self, tier: Tier, size: int) -> None:
        if self._config.write_ahead:
            self._write_ahead(tier, size)

    def _write_ahead(self, tier: Tier, size: int) -> None:
        """Start copying down, as clean copies, the entries that the next puts of ``size``
        bytes into ``tier`` would evict: their demotions then hand over and write nothing,
        while a put waits only for what is not copied yet.  Memory tiers whose evictor can
        name its next victims (``BaseEvictor.next_victims``), above a tier that admits all."""
        below = self._cascade.below(tier)
        if not below:
            return
        into = below[0]
        if not isinstance(into.admission, AdmitAll):
            return  # a copy's offer would count as the key's first: admission sees it once
        ledger = self._ledger
        for key in tier.next_victims(WRITE_AHEAD_PUTS * size):
            if len(ledger.writing_ahead) >= MAX_WRITES_AHEAD:
                return
            obj = tier.lookup(key)
            data = tier.resident_tensor(obj)
            if (
                data is None
                or key in ledger.writing_ahead
                or key in ledger.moving
                or tier.is_leaving(key)
                or self._cascade.holder(key) is not tier
                or any(each.lookup(key) is not None for each in below)
            ):
                continue
            ledger.start_copy(key)
            source = self._cascade.source(tier, obj)
            self._background.spawn(self._copy_ahead(into, key, source, data))

    async def _copy_ahead(self, into: Tier, key: KeyLike, source: Hit, data: torch.Tensor) -> None:
        """Copy ``key``'s entry from ``source`` into ``into`` and keep it above: a clean copy,
        committed only while the entry above is still the key's authoritative one."""
        try:
            with self._ledger.move(key, [into]):
                await self.placement.place(
                    key, data, [into], source, Arrival.WRITE_AHEAD, wait=False
                )
        finally:
            self._ledger.end_copy(key)
