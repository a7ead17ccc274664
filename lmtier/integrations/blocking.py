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
from lmtier.errors import LmtierTypeError, StoreClosedError, StoreForkedError
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike
from lmtier.store import TieredStore

__all__ = ["BlockingStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a store that was garbage-collected or left open at exit may take to close.
_FINALIZE_TIMEOUT_S = 10.0
# How long the calls that a close timed out on may take to end once cancelled, and how long
# each release after that (a tier's, the metrics server's) may take.
_CANCEL_GRACE_S = 5.0
# How long an abandoned close waits for the loop's idle I/O workers to end (they end at once).
_IDLE_WORKER_EXIT_S = 1.0


class BlockingStore:
    """A ``TieredStore`` on a private event-loop thread, with a blocking method per call.

        ``config`` is a ``StoreConfig``, the path of a YAML config, or a mapping validated as a
        YAML file's content is (``LMTIER_*`` overrides included).  The constructor opens the store
        and raises the open's error, if any, in the caller.  ``close`` (or leaving a ``with``
        block) finishes the calls in flight, closes the store and joins the thread; a store that is
        garbage-collected or still open at interpreter exit is closed too, within a bounded time.
    A close whose time runs out cancels what still runs and releases the store all the same.

    The store belongs to the process that opened it: in a child made by ``fork`` (the loop
    thread is not copied) every call raises ``StoreForkedError``, and the child opens a store
    of its own.

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
        if runner.forked:  # checked before the lock, which a parent's thread may have held
            raise StoreForkedError(_FORKED)
        with runner.lock:  # closing takes the lock: no call slips in behind store.close()
            if runner.closed:
                raise StoreClosedError("the store is closed")
            return asyncio.run_coroutine_threadsafe(runner.apply(fn, self.store), runner.loop)

    def submit_background(
        self, fn: Callable[[TieredStore], Awaitable[T]]
    ) -> concurrent.futures.Future[T]:
        """``submit`` for work that runs until cancelled (a periodic report): ``close`` cancels
        it first, with the store still open, and waits for it to end before the other calls."""
        runner = self._runner
        if runner.forked:
            raise StoreForkedError(_FORKED)
        with runner.lock:
            if runner.closed:
                raise StoreClosedError("the store is closed")
            work = runner.apply(fn, self.store, background=True)
            return asyncio.run_coroutine_threadsafe(work, runner.loop)

    def call(self, fn: Callable[[TieredStore], Awaitable[T]], timeout: float | None = None) -> T:
        """``submit`` and wait for the result; TimeoutError (and the call cancelled) after
        ``timeout`` seconds."""
        self._not_on_loop("call")
        future = self.submit(fn)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            if self._runner.closed and not self._runner.forked:
                raise StoreClosedError("the store was closed while the call ran") from None
            raise
        except BaseException:
            # A timeout or KeyboardInterrupt here ends this call only; a store error has
            # already ended it, and cancelling a finished future does nothing.
            future.cancel()
            raise

    def close(self, timeout: float | None = None) -> None:
        """Finish the calls in flight, close the store and stop its thread; later calls do
        nothing.

        After ``timeout`` seconds whatever still runs on the loop (calls, the store's moves) is
        cancelled, the tiers and the metrics server are released all the same (the disk
        folders unlocked, the port freed), and a warning names what was abandoned.  A worker
        thread stuck in a system call cannot be stopped: it ends when the call returns, and
        what it wrote is a temporary file that the folder's next open removes.  In a child
        made by ``fork`` this does nothing: the store is the parent's to close.
        """
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
        self.forked = False  # set in a child made by fork: the loop thread stayed behind
        self.abandoned = False  # a close ran out of time and cancelled what still ran
        # The submitted calls running on the loop, with the function each runs.
        self.calls: dict[asyncio.Future[Any], Callable[[TieredStore], Awaitable[Any]]] = {}
        # The background calls (submit_background): cancelled first by a close.
        self.background: dict[asyncio.Future[Any], Callable[[TieredStore], Awaitable[Any]]] = {}
        _RUNNERS.add(self)

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
            # After an abandoned close a worker may be stuck in a system call: not waited for,
            # though the idle ones, which end at once, are.
            self.executor.shutdown(wait=not self.abandoned, cancel_futures=True)
            if self.abandoned:
                deadline = time.monotonic() + _IDLE_WORKER_EXIT_S
                for worker in list(self.executor._threads):
                    worker.join(max(0.0, deadline - time.monotonic()))
            asyncio.set_event_loop(None)
            loop.close()

    def shutdown(self, timeout: float | None) -> None:
        """Close the store, stop the loop and join the thread, within ``timeout`` seconds."""
        if self.forked:
            return  # the loop thread and the store are the parent's
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            first = not self.closed
            self.closed = True
        if first and self.thread.is_alive():
            closing = asyncio.run_coroutine_threadsafe(self._close_store(), self.loop)
            try:
                closing.result(timeout)
            except concurrent.futures.TimeoutError:
                self._abandon(timeout)
                deadline = time.monotonic() + _CANCEL_GRACE_S
            except Exception:
                log.exception("lmtier store failed to close cleanly")
            self.loop.call_soon_threadsafe(self.loop.stop)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.thread.join(left)
        if self.thread.is_alive():
            log.warning("lmtier loop thread %r is still running after close", self.thread.name)

    def _abandon(self, timeout: float | None) -> None:
        """After a close ran out of time: cancel what runs on the loop, release the store."""
        self.abandoned = True
        releasing = asyncio.run_coroutine_threadsafe(self._cancel_and_release(), self.loop)
        # The cancels, then each tier's release and the metrics server's, each bounded.
        releases = 1 + (0 if self.store is None else len(self.store.tier_infos()))
        try:
            cancelled = releasing.result(_CANCEL_GRACE_S * (1 + releases) + 1)
        except Exception:  # a TimeoutError included: the thread join after it is bounded too
            log.exception("lmtier store: releasing it after an expired close failed")
            return
        log.warning(
            "lmtier store did not close within %ss: cancelled %s; its tiers and metrics server "
            "are released (an I/O worker stuck in a system call ends when that call returns)",
            timeout,
            "; ".join(cancelled) or "nothing (the close itself was slow)",
        )

    async def _cancel_and_release(self) -> list[str]:
        """On the loop: cancel every other task (again, for those that cancelling starts), then
        close each tier and the metrics server; what was cancelled, in words."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        calls = [_label(fn) for task, fn in self.calls.items() if not task.done()]
        others = 0
        seen: set[asyncio.Task[Any]] = set()
        deadline = loop.time() + _CANCEL_GRACE_S
        while (left := [t for t in asyncio.all_tasks() if t is not me and not t.done()]) and (
            wait := deadline - loop.time()
        ) > 0:
            others += sum(1 for task in left if task not in seen and task not in self.calls)
            seen.update(left)
            for task in left:
                task.cancel()
            _, pending = await asyncio.wait(left, timeout=wait)
            if pending:
                break  # tasks that will not end: the loop's wind-down cancels them once more
        store = self.store
        if store is not None:
            await store.release_now(_CANCEL_GRACE_S)
        cancelled = [f"{len(calls)} call(s): {', '.join(calls)}"] if calls else []
        if others:
            cancelled.append(f"{others} task(s) of the store (moves, removals, the close)")
        return cancelled

    def finalize(self) -> None:
        """Close on garbage collection or at exit: bounded, and never waiting on itself."""
        if self.forked:
            return
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

    async def apply(
        self,
        fn: Callable[[TieredStore], Awaitable[T]],
        store: TieredStore,
        *,
        background: bool = False,
    ) -> T:
        task = asyncio.current_task()
        assert task is not None
        calls = self.background if background else self.calls
        calls[task] = fn
        try:
            return await fn(store)
        finally:
            calls.pop(task, None)

    async def _close_store(self) -> None:
        for task in list(self.background):
            task.cancel()
        while self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
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


# Every runner of this process, so that a fork can mark its child's copies unusable.
_RUNNERS: weakref.WeakSet[_Runner] = weakref.WeakSet()
_FORKED = (
    "this BlockingStore was opened in the parent process: its loop thread does not exist in a "
    "child made by fork; open a new store in the child"
)


def _mark_forked() -> None:
    """In a fork's child: no runner's loop thread came along, so each call would wait forever."""
    for runner in list(_RUNNERS):
        runner.forked = True
        runner.closed = True
        runner.lock = threading.Lock()  # a parent's thread may have held it at the fork


os.register_at_fork(after_in_child=_mark_forked)


def _label(fn: Callable[..., Any]) -> str:
    """A submitted function in words: the method it came from (``BlockingStore.put``)."""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return name.split(".<locals>", 1)[0] if ".<lambda>" in name else name


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
