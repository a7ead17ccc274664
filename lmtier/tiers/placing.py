"""One entry's way into one tier: admitted, reserved, written, committed, or undone.

``Placing`` is the bookkeeping of that way, synchronous, so that the replay simulator (sizes,
no data) drives the same steps as the store; ``Slot`` (what ``Tier.place`` returns) adds the
awaits of a real tier: waiting for room, writing the bytes, and discarding a write that did
not commit.  Both undo themselves on exit without a commit.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from lmtier.keys import KeyLike
from lmtier.tiers.counters import Arrival

if TYPE_CHECKING:
    from lmtier.tiers.base import Tier

__all__ = ["Placing", "Slot"]


class _Stage(enum.Enum):
    NEW = enum.auto()
    REFUSED = enum.auto()  # the evictor found no room
    ADMITTED = enum.auto()  # charged to the evictor; victims chosen, leaving
    RESERVED = enum.auto()  # the bytes held in the tier's budget
    COMMITTED = enum.auto()
    UNDONE = enum.auto()


class Placing:
    """The bookkeeping of placing ``key`` (``size`` bytes) into ``tier``, as a context manager.

    On entry the tier's evictor is asked for room: ``victims`` is None if it refused, else
    the entries it chose, still readable and now leaving; the caller takes them out of the
    tier (``Tier.remove``) before the bytes can be reserved.  ``commit`` makes the entry
    visible and counts its ``arrival``; leaving without a commit gives back the charge and
    the reservation, as if nothing had been asked.
    """

    def __init__(
        self,
        tier: Tier,
        key: KeyLike,
        size: int,
        arrival: Arrival = Arrival.PUT,
        position: int | None = None,
    ) -> None:
        self.tier = tier
        self.key = key
        self.size = size
        self.arrival = arrival
        self.position = position
        self.victims: list[tuple[KeyLike, Any]] | None = None
        self._stage = _Stage.NEW

    def __enter__(self) -> Placing:
        self.ask()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.undo()

    @property
    def admitted(self) -> bool:
        """Whether the evictor made room (and the placement is not undone)."""
        return self._stage in (_Stage.ADMITTED, _Stage.RESERVED, _Stage.COMMITTED)

    @property
    def awaits_room(self) -> bool:
        """Whether the evictor made room and the bytes are not reserved yet."""
        return self._stage is _Stage.ADMITTED

    @property
    def holds_room(self) -> bool:
        """Whether the bytes are reserved and not yet committed (a write may fill them)."""
        return self._stage is _Stage.RESERVED

    @property
    def committed(self) -> bool:
        return self._stage is _Stage.COMMITTED

    def ask(self) -> None:
        """Ask the tier's evictor for room (``Tier.admit``); ``victims`` says what it chose."""
        if self._stage is not _Stage.NEW:
            raise RuntimeError(f"{self.key!r}: room asked twice of tier {self.tier.name!r}")
        self.victims = self.tier.admit(self.key, self.size, self.position)
        self._stage = _Stage.REFUSED if self.victims is None else _Stage.ADMITTED

    def reserve_now(self) -> bool:
        """Hold the bytes in the tier's budget if they fit now; whether they do."""
        self._require(_Stage.ADMITTED, "reserve")
        if not self.tier.try_reserve(self.size):
            return False
        self._stage = _Stage.RESERVED
        return True

    def reserved(self) -> None:
        """Note that ``Tier.reserve`` holds the bytes (a caller that waited for them)."""
        self._require(_Stage.ADMITTED, "reserve")
        self._stage = _Stage.RESERVED

    def commit(self, obj: Any) -> None:
        """Make the written ``obj`` the key's visible entry in the tier, and count its arrival."""
        self._require(_Stage.RESERVED, "commit")
        self.tier.commit(self.key, obj, self.size)
        self.tier.record_arrival(self.arrival)
        self._stage = _Stage.COMMITTED

    def undo(self) -> None:
        """Give back what is held, unless committed: the reservation and the evictor's charge."""
        if self._stage is _Stage.RESERVED:
            self.tier.unreserve(self.key, self.size)
        elif self._stage is _Stage.ADMITTED:
            self.tier.cancel(self.key, self.size)
        if self._stage is not _Stage.COMMITTED:
            self._stage = _Stage.UNDONE

    def _require(self, stage: _Stage, step: str) -> None:
        if self._stage is not stage:
            raise RuntimeError(
                f"{self.key!r}: cannot {step} in tier {self.tier.name!r} "
                f"while {self._stage.name.lower()}"
            )


class Slot:
    """Room for one entry in a tier while it is written: ``async with tier.place(...) as slot``.

    ``victims`` is None if the evictor refused, else the entries that must leave (the caller
    moves them out) before ``reserve`` can hold the bytes.  Then ``write`` stages the bytes,
    ``publish`` and ``commit`` make them the key's entry.  Leaving the block without a commit
    (an exception, a cancellation, a failed write, a move gone stale) undoes the slot: the
    reservation and the evictor's charge are given back and a staged write is discarded, so
    nothing of it is visible.  The budget holds at every await: the bytes are reserved
    before they are written.
    """

    def __init__(
        self,
        tier: Tier,
        key: KeyLike,
        size: int,
        arrival: Arrival = Arrival.PUT,
        position: int | None = None,
    ) -> None:
        self.tier = tier
        self._placing = Placing(tier, key, size, arrival, position)
        self._written: Any = None

    @property
    def key(self) -> KeyLike:
        return self._placing.key

    @property
    def size(self) -> int:
        return self._placing.size

    @property
    def victims(self) -> list[tuple[KeyLike, Any]] | None:
        return self._placing.victims

    async def __aenter__(self) -> Slot:
        self._placing.ask()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        written, self._written = self._written, None
        if self._placing.committed:
            return
        self._placing.undo()
        if written is not None:
            await self.tier.discard(written)

    async def reserve(self, timeout: float) -> None:
        """Wait until the bytes fit (the victims gone), then hold them; ``TimeoutError`` after
        ``timeout`` seconds."""
        if not self._placing.awaits_room:
            raise RuntimeError(f"{self.key!r}: reserve without room in tier {self.tier.name!r}")
        await self.tier.reserve(self.size, timeout)
        self._placing.reserved()

    async def write(self, data: torch.Tensor, current: Callable[[], bool] | None = None) -> Any:
        """Stage a copy of ``data`` in the tier (not visible yet); the tier's object for it.
        ``current``: whether the write is still wanted (see ``Tier.write``)."""
        if not self._placing.holds_room:
            raise RuntimeError(f"{self.key!r}: write before reserve in tier {self.tier.name!r}")
        self._written = await self.tier.write(self.key, data, current)
        return self._written

    def publish(self) -> None:
        """Make the staged write what a restart would find (``Tier.publish``), right before
        the commit."""
        self.tier.publish(self._written)

    def commit(self) -> None:
        """Make the written entry visible in the tier and count its arrival."""
        if self._written is None:
            raise RuntimeError(f"{self.key!r}: commit before a write to tier {self.tier.name!r}")
        self._placing.commit(self._written)
