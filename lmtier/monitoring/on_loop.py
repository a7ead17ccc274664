"""Reading a store's state from another thread (an HTTP scrape) without racing its loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["LoopHome", "call_on_loop"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# A loop that cannot run a short read within this long is stuck: read without it.
_LOOP_TIMEOUT_S = 2.0
# A read off the loop may meet a dict that the loop resizes under it (RuntimeError): retry.
_DIRECT_ATTEMPTS = 5


class LoopHome:
    """The event loop (and its thread) a store runs on, recorded when it opens."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: int | None = None

    def record(self) -> None:
        """Called on the store's loop, when it opens."""
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()


def call_on_loop(home: LoopHome, read: Callable[[], T], timeout: float = _LOOP_TIMEOUT_S) -> T:
    """``read()`` run on the store's loop, between two of its steps, and its result.

    The store is not thread-safe: its state is consistent only between steps of its loop.  On
    the loop's own thread, or when the loop is not running, ``read`` runs here.  A loop that does
    not answer within ``timeout`` (a blocking call stalls it) is read without it: a scrape must
    answer, and every value read is one number, so the worst is a value one step out of date.
    """
    loop = home.loop
    if loop is None or not loop.is_running() or threading.get_ident() == home.thread:
        return _direct(read)
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(read())
        except BaseException as exc:
            done.set_exception(exc)

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # the loop closed meanwhile
        return _direct(read)
    try:
        return done.result(timeout)
    except concurrent.futures.TimeoutError:
        if not done.cancel():  # it started at last: its answer is on its way
            return done.result()
        log.warning("the store's event loop did not answer within %.1f s: read without it", timeout)
        return _direct(read)


def _direct(read: Callable[[], T]) -> T:
    for attempt in range(_DIRECT_ATTEMPTS):
        try:
            return read()
        except RuntimeError:  # "dictionary changed size during iteration"
            if attempt == _DIRECT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")
