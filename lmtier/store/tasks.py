"""Work the store finishes even when its caller goes away, and the calls in flight."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol, TypeVar

from lmtier.monitoring import OperationHistograms

__all__ = ["Background", "Gate", "Operation"]

log = logging.getLogger("lmtier.store")
T = TypeVar("T")


class Background:
    """The store's background tasks and the count of public calls in flight."""

    __slots__ = ("_idle", "active", "tasks")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.active = 0
        self._idle: asyncio.Event | None = None

    @property
    def quiescent(self) -> bool:
        return not self.active and not self.tasks

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` to completion even if the caller is cancelled: moves never stop halfway."""
        # As asyncio.shield, but the task answers the caller itself as it ends, which saves
        # the event-loop turn a done callback costs (a tenth of a small put).
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.spawn(_answering(work, answer))
        return await answer

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start ``work`` as a task that ``drain`` waits for."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def enter(self) -> None:
        self.active += 1
        self._idle_event().clear()

    def leave(self) -> None:
        self.active -= 1
        if not self.active:
            self._idle_event().set()

    async def drain(self) -> None:
        """Wait until no call is in flight and no background task runs."""
        while self.active or self.tasks:
            if self.tasks:
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
            if self.active:
                await self._idle_event().wait()

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


class Gate(Protocol):
    """What an operation asks of the store before it runs: open, and not closed."""

    @property
    def background(self) -> Background: ...

    @property
    def ready(self) -> bool:
        """Whether the tiers are open (no await needed)."""

    def check_open(self) -> None: ...

    async def open(self) -> None: ...


class Operation:
    """Counts a public call in flight so that ``close`` can wait for it.

    With ``histograms`` (the metrics' puts or gets, by tier) the call is timed: one that returns
    is observed under ``tier`` with ``nbytes``, which the call sets once it knows them (tier
    None: no tier took the put, or the get missed).
    """

    __slots__ = ("gate", "histograms", "nbytes", "started", "tier")

    def __init__(
        self,
        gate: Gate,
        histograms: Mapping[str | None, OperationHistograms] | None = None,
        nbytes: int = 0,
    ) -> None:
        self.gate = gate
        self.histograms = histograms
        self.nbytes = nbytes
        self.tier: str | None = None
        self.started = time.perf_counter() if histograms is not None else 0.0

    def found(self, tier: str, nbytes: int) -> None:
        """The call was served by ``tier`` with ``nbytes``."""
        self.tier, self.nbytes = tier, nbytes

    async def __aenter__(self) -> Operation:
        gate = self.gate
        gate.check_open()
        if not gate.ready:
            await gate.open()
        gate.background.enter()
        return self

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        self.gate.background.leave()
        if self.histograms is not None and exc_type is None:
            self.histograms[self.tier].observe(time.perf_counter() - self.started, self.nbytes)
