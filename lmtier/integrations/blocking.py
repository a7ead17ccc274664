"""A blocking, thread-safe facade over ``TieredStore`` for engines that call from threads.

The store runs on an event loop in a private daemon thread; each method hands its call to that
loop and waits for the answer, so any thread may call it.  An exception raised in the store is
raised again in the caller with its own type.  The store itself is not thread-safe: its
synchronous methods (``pin``, ``stats``, ...) run on the loop thread too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from lmtier.config import StoreConfig, config_from_mapping, load_config
from lmtier.errors import LmtierTypeError, StoreClosedError
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike
from lmtier.store import TieredStore

__all__ = ["BlockingStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a store that was garbage-collected or left open at exit may take to close.
_FINALIZE_TIMEOUT_S = 10.0
# How long the calls that a close timed out on may take to end once cancelled.
_CANCEL_GRACE_S = 5.0


class BlockingStore:
    """A ``TieredStore`` on a private event-loop thread, with a blocking method per call.

    ``config`` is a ``StoreConfig``, the path of a YAML config, or a mapping validated as a
    YAML file's content is (``LMTIER_*`` overrides included).  The constructor opens the store
    and raises the open's error, if any, in the caller.  ``close`` (or leaving a ``with``
    block) finishes the calls in flight, closes the store and joins the thread; a store that is
    garbage-collected or still open at interpreter exit is closed too, within a bounded time.

    A blocking method called on the loop thread itself (from a function given to ``submit``
    or an ``on_drop`` callback) raises RuntimeError, since it would wait for itself forever;
    such code awaits the ``TieredStore`` methods directly.  After ``close`` every call raises
    ``StoreClosedError``.  A caller that times out or is interrupted cancels its own call
    only; the store's moves always finish and the loop keeps serving the other threads.
    """

    store: TieredStore
    loop: asyncio.AbstractEventLoop

    def __init__(
        self,
        config: StoreConfig | str | os.PathLike[str] | Mapping[str, Any],
        *,
        on_drop: Callable[[KeyLike], None] | None = None,
        thread_name: str = "lmtier",
    ) -> None:
        parsed = _as_config(config)
        runner = _Runner(thread_name)
        self._runner = runner
        self.loop = runner.loop
        runner.thread.start()
        opening = asyncio.run_coroutine_threadsafe(_open_store(parsed, on_drop), runner.loop)
        try:
            self.store = runner.store = opening.result()
        except BaseException:
            opening.cancel()
            runner.shutdown(_FINALIZE_TIMEOUT_S)
            raise
        # Holds the runner, not self: collecting this object closes the store.
        self._finalizer = weakref.finalize(self, runner.finalize)

    # ------------------------------------------------------------------ store calls
    def put(self, key: KeyLike, tensor: torch.Tensor, *, position: int | None = None) -> PutStatus:
        return self.call(lambda store: store.put(key, tensor, position=position))

    def put_many(
        self,
        items: Iterable[tuple[KeyLike, torch.Tensor]],
        *,
        positions: Mapping[KeyLike, int] | None = None,
    ) -> list[PutStatus]:
        batch = list(items)  # a generator runs in the caller's thread, not on the loop
        return self.call(lambda store: store.put_many(batch, positions=positions))

    def get(
        self,
        key: KeyLike,
        device: str | torch.device | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        return self.call(lambda store: store.get(key, device, out=out))

    def get_many(
        self, keys: Sequence[KeyLike], device: str | torch.device | None = None
    ) -> list[torch.Tensor | None]:
        batch = list(keys)
        return self.call(lambda store: store.get_many(batch, device))

    def contains(self, key: KeyLike) -> str | None:
        return self.call(lambda store: store.contains(key))

    def delete(self, key: KeyLike) -> bool:
        return self.call(lambda store: store.delete(key))

    def pin(self, key: KeyLike) -> str | None:
        return self.call(lambda store: _now(store.pin, key))

    def unpin(self, key: KeyLike) -> None:
        self.call(lambda store: _now(store.unpin, key))

    def stats(self) -> dict[str, Any]:
        return self.call(lambda store: _now(store.stats))

    def audit(self) -> list[str]:
        return self.call(lambda store: _now(store.audit))

    # ------------------------------------------------------------------ anything else
    def submit(self, fn: Callable[[TieredStore], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Run ``fn(store)`` on the loop and return its future at once (from any thread).

        The future is cancelled if the store is closed before ``fn`` finishes.
        """
        runner = self._runner
        with runner.lock:  # closing takes the lock: no call slips in behind store.close()
            if runner.closed:
                raise StoreClosedError("the store is closed")
            return asyncio.run_coroutine_threadsafe(runner.apply(fn, self.store), runner.loop)

    def call(self, fn: Callable[[TieredStore], Awaitable[T]], timeout: float | None = None) -> T:
        """``submit`` and wait for the result; TimeoutError (and the call cancelled) after
        ``timeout`` seconds."""
        self._not_on_loop("call")
        future = self.submit(fn)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            if self._runner.closed:
                raise StoreClosedError("the store was closed while the call ran") from None
            raise
        except BaseException:
            # A timeout or KeyboardInterrupt here ends this call only; a store error has
            # already ended it, and cancelling a finished future does nothing.
            future.cancel()
            raise

    def close(self, timeout: float | None = None) -> None:
        """Finish the calls in flight, close the store and stop its thread; later calls do
        nothing.  After ``timeout`` seconds the calls still running are cancelled (logged),
        and the thread gets a few more seconds to end."""
        self._not_on_loop("close")
        self._finalizer.detach()
        self._runner.shutdown(timeout)

    @property
    def closed(self) -> bool:
        return self._runner.closed

    def __enter__(self) -> BlockingStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _not_on_loop(self, what: str) -> None:
        if threading.get_ident() == self._runner.thread.ident:
            raise RuntimeError(
                f"BlockingStore.{what}() was called on the store's own loop thread, where it "
                "would wait for itself forever: await the TieredStore method instead"
            )


class _Runner:
    """The loop thread and what stopping it needs; it holds no reference to its
    ``BlockingStore``, so a finalizer can use it."""

    def __init__(self, thread_name: str) -> None:
        self.loop = asyncio.new_event_loop()
        # The loop's own executor (disk reads and writes run there), named and joined on close.
        self.executor = concurrent.futures.ThreadPoolExecutor(
            thread_name_prefix=f"{thread_name}-io"
        )
        self.loop.set_default_executor(self.executor)
        self.thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self.store: TieredStore | None = None
        self.lock = threading.Lock()
        self.closed = False
        self.calls: set[asyncio.Future[Any]] = set()  # submitted calls running on the loop

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self._wind_down()

    def _wind_down(self) -> None:
        """On the loop thread once the loop stopped: cancel what is left, release it all."""
        loop = self.loop
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except Exception:
            log.exception("lmtier loop thread: winding down failed")
        finally:
            self.executor.shutdown(wait=True, cancel_futures=True)
            asyncio.set_event_loop(None)
            loop.close()

    def shutdown(self, timeout: float | None) -> None:
        """Close the store, stop the loop and join the thread, within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            first = not self.closed
            self.closed = True
        if first and self.thread.is_alive():
            closing = asyncio.run_coroutine_threadsafe(self._close_store(), self.loop)
            try:
                closing.result(timeout)
            except concurrent.futures.TimeoutError:
                log.warning(
                    "lmtier store did not close within %ss: cancelling the calls still running",
                    timeout,
                )
                deadline = time.monotonic() + _CANCEL_GRACE_S
            except Exception:
                log.exception("lmtier store failed to close cleanly")
            self.loop.call_soon_threadsafe(self.loop.stop)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.thread.join(left)
        if self.thread.is_alive():
            log.warning("lmtier loop thread %r is still running after close", self.thread.name)

    def finalize(self) -> None:
        """Close on garbage collection or at exit: bounded, and never waiting on itself."""
        if threading.get_ident() != self.thread.ident:
            self.shutdown(_FINALIZE_TIMEOUT_S)
            return
        with self.lock:
            first = not self.closed
            self.closed = True
        if (
            first and not self.loop.is_closed()
        ):  # collected on the loop thread: close there, then let the thread end
            self.loop.create_task(self._close_then_stop())

    async def apply(self, fn: Callable[[TieredStore], Awaitable[T]], store: TieredStore) -> T:
        task = asyncio.current_task()
        assert task is not None
        self.calls.add(task)
        try:
            return await fn(store)
        finally:
            self.calls.discard(task)

    async def _close_store(self) -> None:
        # The submitted calls first: a function given to submit may still start store calls.
        while self.calls:
            await asyncio.gather(*self.calls, return_exceptions=True)
        if self.store is not None:
            await self.store.close()

    async def _close_then_stop(self) -> None:
        try:
            await self._close_store()
        finally:
            self.loop.stop()


def _as_config(config: StoreConfig | str | os.PathLike[str] | Mapping[str, Any]) -> StoreConfig:
    if isinstance(config, StoreConfig):
        return config
    if isinstance(config, str | os.PathLike):
        return load_config(config)
    if isinstance(config, Mapping):
        return config_from_mapping(config)
    raise LmtierTypeError(
        "config must be a StoreConfig, a path to a YAML config or a mapping, "
        f"got {type(config).__name__}"
    )


async def _open_store(
    config: StoreConfig, on_drop: Callable[[KeyLike], None] | None
) -> TieredStore:
    """Built on the loop thread, so that whatever the tiers bind to a loop binds to this one."""
    store = TieredStore(config, on_drop=on_drop)
    try:
        await store.open()
    except BaseException:
        await store.close()  # release what the tiers that did open hold (a disk tier's lock)
        raise
    return store


async def _now(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)
