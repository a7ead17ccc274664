"""Blocking calls run in a worker thread, many per thread hop."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ThreadBatcher"]

T = TypeVar("T")


class ThreadBatcher:
    """Runs blocking calls off the event loop; calls queued while a hop is under way ride it.

    A hop to a worker thread and back costs about 100 us, more than writing or removing a
    small file, so a burst of small operations (a request's chunks, the files of dropped
    entries) is served by one hop instead of one each.  Calls run one after another, in
    the order they were queued.
    """

    def __init__(self) -> None:
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = (
            deque()
        )
        self._draining = False
        self.hops = 0  # worker jobs started, for tests and benchmarks

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread; its result, or its exception raised here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((fn, args, future))
        if not self._draining:
            self._start(loop)
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._draining = True
        self.hops += 1
        loop.run_in_executor(None, self._drain, loop)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Worker side: run queued calls until the queue is empty, then hand back to the loop."""
        while True:
            fn, args, future = self._queue.popleft()
            try:
                outcome: tuple[Any, BaseException | None] = (fn(*args), None)
            except BaseException as exc:  # handed to the caller, as to_thread would
                outcome = (None, exc)
            # Let go of the arguments before answering: a caller may reuse their memory as
            # soon as it hears back, once nothing else refers to them.
            del fn, args
            if not self._queue:
                # Only the loop decides that draining stopped, so a call queued meanwhile is
                # not stranded; and the last answer rides the same wake-up.
                loop.call_soon_threadsafe(self._finish, loop, future, outcome)
                return
            loop.call_soon_threadsafe(_settle, future, *outcome)

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        outcome: tuple[Any, BaseException | None],
    ) -> None:
        _settle(future, *outcome)
        self._draining = False
        if self._queue:
            self._start(loop)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
