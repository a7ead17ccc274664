"""A TieredStore for threaded callers: the store runs on a private event-loop thread.

Minimal: what lmtier.integrations.vllm needs, with the full facade's signatures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from lmtier.config import StoreConfig, load_config, parse_config
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike
from lmtier.store import TieredStore

__all__ = ["BlockingStore"]

T = TypeVar("T")


def _as_config(config: StoreConfig | str | os.PathLike[str] | Mapping[str, Any]) -> StoreConfig:
    if isinstance(config, StoreConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(config)
    return load_config(config)


class BlockingStore:
    """Blocking calls into a TieredStore that lives on its own event-loop thread."""

    def __init__(
        self,
        config: StoreConfig | str | os.PathLike[str] | Mapping[str, Any],
        *,
        on_drop: Callable[[KeyLike], None] | None = None,
        thread_name: str = "lmtier",
    ) -> None:
        self.loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self.store: TieredStore = TieredStore(_as_config(config), on_drop=on_drop)
            self.call(lambda store: store.open())
        except BaseException:
            self._stop()
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, fn: Callable[[TieredStore], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Run ``fn(store)`` on the store's loop; returns at once."""

        async def run() -> T:
            return await fn(self.store)

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    def call(self, fn: Callable[[TieredStore], Awaitable[T]], timeout: float | None = None) -> T:
        """Run ``fn(store)`` on the store's loop and wait for its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("BlockingStore.call from the store's own loop thread")
        return self.submit(fn).result(timeout)

    def put(self, key: KeyLike, tensor: torch.Tensor, *, position: int | None = None) -> PutStatus:
        return self.call(lambda s: s.put(key, tensor, position=position))

    def put_many(
        self,
        items: Iterable[tuple[KeyLike, torch.Tensor]],
        *,
        positions: Mapping[KeyLike, int] | None = None,
    ) -> list[PutStatus]:
        listed = list(items)
        return self.call(lambda s: s.put_many(listed, positions=positions))

    def get(
        self,
        key: KeyLike,
        device: str | torch.device | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        return self.call(lambda s: s.get(key, device, out=out))

    def get_many(
        self, keys: Sequence[KeyLike], device: str | torch.device | None = None
    ) -> list[torch.Tensor | None]:
        return self.call(lambda s: s.get_many(keys, device))

    def contains(self, key: KeyLike) -> str | None:
        return self.call(lambda s: s.contains(key))

    def delete(self, key: KeyLike) -> bool:
        return self.call(lambda s: s.delete(key))

    def pin(self, key: KeyLike) -> str | None:
        return self.call(lambda s: _ready(s.pin(key)))

    def unpin(self, key: KeyLike) -> None:
        async def unpin(store: TieredStore) -> None:
            store.unpin(key)

        self.call(unpin)

    def stats(self) -> dict[str, Any]:
        return self.call(lambda s: _ready(s.stats()))

    def audit(self) -> list[str]:
        return self.call(lambda s: _ready(s.audit()))

    def close(self, timeout: float | None = None) -> None:
        """Finish in-flight work, close the store and stop the thread; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.call(lambda s: s.close(), timeout)
        finally:
            self._stop()

    def _stop(self) -> None:
        self._closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def __enter__(self) -> BlockingStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _ready(value: T) -> T:
    return value
