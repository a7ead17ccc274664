"""Placement: write an entry into the first candidate tier that takes it, and commit it there."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmtier.config import StoreConfig
from lmtier.errors import TierUnavailableError
from lmtier.keys import KeyLike
from lmtier.store.cascade import Cascade, Hit
from lmtier.store.ledger import KeyLedger
from lmtier.tiers.base import Arrival, Tier
from lmtier.tiers.placing import Slot

__all__ = ["Outcome", "Placement"]

log = logging.getLogger("lmtier.store")

#: Moves the victims of a slot out of its tier and reserves the slot's bytes.
MakeRoom = Callable[[Slot], Coroutine[Any, Any, None]]


class Outcome(enum.Enum):
    PLACED = enum.auto()
    REFUSED = enum.auto()  # no candidate tier took it
    FAILED = enum.auto()  # a tier took it but could not write it (and no later tier did)
    STALE = enum.auto()  # the moved entry was deleted or replaced meanwhile


class _Verdict(enum.Enum):
    """How a placement into one tier ended."""

    PLACED = enum.auto()
    STALE = enum.auto()
    FULL = enum.auto()  # no room for now
    TIMED_OUT = enum.auto()  # no room within the room timeout
    FAILED = enum.auto()  # the write or its publication failed


@dataclass
class _Attempt:
    """One pass over the candidate tiers: its outcome, the tiers that had no room for now
    (worth waiting for) and those whose write failed (skipped for the rest of the placement)."""

    outcome: Outcome
    full: list[Tier] = field(default_factory=list)
    failed: list[Tier] = field(default_factory=list)

    def fail(self, tier: Tier) -> None:
        self.outcome = Outcome.FAILED
        self.failed.append(tier)


class _Currency:
    """Whether one placement's write into ``tier`` may still commit: a move's ``source`` still
    holds the key's authoritative entry and ``tier`` no copy of it; a put's ``ticket`` is not
    overtaken by a later put that committed.  Once false, false for good: a tier that sent
    nothing on that word (``Tier.write``) and the commit that follows it agree."""

    __slots__ = ("_cascade", "_key", "_ledger", "_source", "_stale", "_ticket", "_tier")

    def __init__(
        self,
        cascade: Cascade,
        ledger: KeyLedger,
        tier: Tier,
        key: KeyLike,
        source: Hit | None,
        ticket: int,
    ) -> None:
        self._cascade, self._ledger, self._tier = cascade, ledger, tier
        self._key, self._source, self._ticket = key, source, ticket
        self._stale = False

    def __call__(self) -> bool:
        if not self._stale:
            if self._source is not None:
                current = self._cascade.still_current(self._key, self._source, self._tier)
            else:
                current = not self._ledger.superseded(self._key, self._ticket)
            self._stale = not current
        return not self._stale


class Placement:
    """Puts and moves: each is written into one tier and committed there, or not at all.

    Each tier is tried through its slot (``Tier.place``), which undoes itself unless it
    commits.  ``make_room`` demotes a slot's victims and reserves its bytes; ``committed``
    hears of each commit (the tier and the bytes), to write ahead.
    """

    def __init__(
        self,
        config: StoreConfig,
        cascade: Cascade,
        ledger: KeyLedger,
        make_room: MakeRoom,
        committed: Callable[[Tier, int], None],
    ) -> None:
        self._config = config
        self._cascade = cascade
        self._ledger = ledger
        self._make_room = make_room
        self._committed = committed

    async def place(
        self,
        key: KeyLike,
        data: torch.Tensor,
        candidates: Sequence[Tier],
        source: Hit | None,
        arrival: Arrival = Arrival.PUT,
        wait: bool = True,
        ticket: int = 0,
    ) -> Outcome:
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
        deadline = loop.time() + self._config.room_timeout_s
        while True:
            if source is not None and not self._cascade.still_current(key, source):
                return Outcome.STALE
            tiers = [tier for tier in could_fit if tier not in failed and tier.reachable]
            seen = {tier: tier.changes for tier in tiers}
            attempt = await self._place_once(
                key, data, size, tiers, source, arrival, admitted, ticket
            )
            if attempt.outcome is not Outcome.REFUSED and attempt.outcome is not Outcome.FAILED:
                return attempt.outcome
            failed.update(attempt.failed)
            # Only a refusal because entries are in use or in flight is worth waiting out; a
            # tier that failed or is unreachable is skipped, never the reason to give up.
            remaining = deadline - loop.time()
            if not wait or not attempt.full or remaining <= 0:
                if waited and attempt.full:
                    self.note_room_timeout(key, size, attempt.full)
                return attempt.outcome
            # A tier that changed while this pass awaited a later one is tried again at once.
            if all(tier.changes == seen[tier] for tier in attempt.full):
                changes = [tier.changed() for tier in attempt.full]
                await asyncio.wait(changes, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                waited = True

    async def _place_once(
        self,
        key: KeyLike,
        data: torch.Tensor,
        size: int,
        candidates: Sequence[Tier],
        source: Hit | None,
        arrival: Arrival,
        admitted: dict[Tier, bool],
        ticket: int,
    ) -> _Attempt:
        ledger = self._ledger
        attempt = _Attempt(Outcome.REFUSED)
        for tier in candidates:
            if tier not in admitted:  # asking records the offer, so only once per placement
                admitted[tier] = tier.admits(key, size)
            if not admitted[tier]:
                continue
            if source is None:
                if ledger.superseded(key, ticket):
                    return _Attempt(Outcome.PLACED)  # a later put's value is in already
                replaced_here = tier.make_way(key, size)
                if replaced_here is not None:
                    ledger.notify_drop(key)  # reported only if this put then fails
                    await ledger.discard(tier, key, replaced_here)
            verdict = await self._place_in(tier, key, data, size, source, arrival, ticket)
            if verdict is _Verdict.TIMED_OUT:
                self.note_room_timeout(key, size, [tier])
            if verdict is _Verdict.FULL or verdict is _Verdict.TIMED_OUT:
                attempt.full.append(tier)
            elif verdict is _Verdict.FAILED:
                attempt.fail(tier)
            else:
                return _Attempt(Outcome.PLACED if verdict is _Verdict.PLACED else Outcome.STALE)
        return attempt

    async def _place_in(
        self,
        tier: Tier,
        key: KeyLike,
        data: torch.Tensor,
        size: int,
        source: Hit | None,
        arrival: Arrival,
        ticket: int,
    ) -> _Verdict:
        """Place into one tier through its slot, which undoes itself unless it commits."""
        ledger, cascade = self._ledger, self._cascade
        async with tier.place(key, size, arrival, ledger.positions.get(key)) as slot:
            if slot.victims is None:
                return _Verdict.FULL
            try:
                await self._make_room(slot)
            except TimeoutError:
                return _Verdict.TIMED_OUT
            current = _Currency(cascade, ledger, tier, key, source, ticket)
            try:
                obj = await slot.write(data, current)
            except Exception as exc:
                self._count_failure(tier, f"could not write {key!r}", exc)
                return _Verdict.FAILED
            # From the currency check to the commit nothing awaits: a delete or put of the key
            # comes wholly before (the move goes stale) or wholly after.
            if not current():
                # A move: stale.  A put: a later put's value is in; this one came before it.
                return _Verdict.STALE if source is not None else _Verdict.PLACED
            try:
                slot.publish()
            except OSError as exc:
                self._count_failure(tier, f"could not publish {key!r}", exc)
                return _Verdict.FAILED
            replaced: list[tuple[Tier, Any]] = []
            if source is None:
                replaced = cascade.remove_everywhere(key)
                ledger.committed(key, ticket)
            elif not arrival.keeps_source or not self._config.clean_copies:
                source.tier.remove(key)
                replaced = [(source.tier, source.obj)]
            slot.commit()
        self._committed(tier, size)
        for old_tier, old_obj in replaced:  # (a promotion's source stays: a clean copy)
            await ledger.discard(old_tier, key, old_obj)
        await tier.make_durable(obj)
        return _Verdict.PLACED

    def _count_failure(self, tier: Tier, what: str, exc: Exception) -> None:
        errors = tier.record_error()
        # The tier logged an outage once; a full disk fails every write: log the 1st, 2nd,
        # 4th, 8th... failure, with the count.
        if not isinstance(exc, TierUnavailableError) and errors & (errors - 1) == 0:
            log.warning("tier %r %s: %s (its error %d)", tier.name, what, exc, errors)

    def note_room_timeout(self, key: KeyLike, size: int, full: Sequence[Tier]) -> None:
        """A put or move waited ``room_timeout_s`` for room in vain: count it, say what held it."""
        for tier in full:
            tier.record_room_timeout()
        log.warning(
            "%r (%d bytes) found no room within %.1f s: %s",
            key,
            size,
            self._config.room_timeout_s,
            "; ".join(tier.describe_room() for tier in full),
        )
