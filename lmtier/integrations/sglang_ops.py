"""Where the SGLang HiCache backend's pages go: the ``PageMover`` it calls, and the one on a
store of its own (``StorePages``), whose batch operations are coroutines on the store's loop.

Kept apart from the backend (``lmtier.integrations.sglang``), which runs on SGLang's threads
and only hands these to the store's loop: each reads, writes, probes or deletes a batch of pages
concurrently, and a page's own failure is logged and answered as a miss, never raised.  The
mover on an lmtier server is ``lmtier.integrations.sglang_server.ServerPages``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from lmtier.errors import LmtierError
from lmtier.evictor import PutStatus
from lmtier.integrations.blocking import BlockingStore
from lmtier.store import TieredStore

__all__ = ["PageMover", "StorePages", "delete_suffixed", "get_all", "leading_hits", "put_all"]

# The backend's logger: its lines keep the name users filter on.
log = logging.getLogger("lmtier.integrations.sglang")


class PageMover(Protocol):
    """What the backend moves its pages with, called on SGLang's threads.

    Keys arrive suffixed (model, rank).  No method raises: a failure of the whole batch (a
    store that is closed, a server that is down) is logged and answered as misses, pages not
    stored, no hits, or a clear that did not happen, and never as wrong bytes.
    """

    def get_all(
        self, keys: list[str], outs: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        """Each key's page copied into its ``out`` (then ``out`` itself), or a new CPU tensor
        where ``out`` is None; None for a miss, or a page of another dtype or shape than
        ``out``'s."""
        ...

    def put_all(self, keys: list[str], pages: list[torch.Tensor]) -> list[bool]:
        """Store each page under its key (a key already stored is left as it is: its page names
        its tokens and their whole prefix); True for each key stored now or before."""
        ...

    def leading_hits(self, keys: list[str]) -> int:
        """How many of ``keys``, from the first, are stored: the count stops at the first miss."""
        ...

    def clear(self, suffixes: tuple[str, ...]) -> bool:
        """Delete the entries whose keys end with one of ``suffixes``; False if it failed."""
        ...

    def stats(self) -> dict[str, Any]:
        """The store's ``stats()``."""
        ...

    def close(self) -> None:
        """Finish what is in flight and let go of the store; later calls answer as failed."""
        ...


class StorePages:
    """``PageMover`` on the backend's own ``TieredStore`` (a ``BlockingStore`` thread)."""

    def __init__(self, store: BlockingStore) -> None:
        self.store = store

    def get_all(
        self, keys: list[str], outs: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        return self._run(get_all, keys, list(outs), default=None)

    def put_all(self, keys: list[str], pages: list[torch.Tensor]) -> list[bool]:
        return self._run(put_all, keys, pages, default=False)

    def leading_hits(self, keys: list[str]) -> int:
        try:
            hits: int = self.store.call(lambda store: leading_hits(store, keys))
        except LmtierError as exc:
            log.warning("lmtier batch_exists failed: %s", exc)
            return 0
        return hits

    def clear(self, suffixes: tuple[str, ...]) -> bool:
        try:
            removed = self.store.call(lambda store: delete_suffixed(store, suffixes))
        except LmtierError as exc:
            log.error("lmtier clear failed: %s", exc)
            return False
        log.info("lmtier HiCache storage cleared: %d entries", removed)
        return True

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    def close(self) -> None:
        self.store.close()

    def _run(self, fn: Any, keys: list[str], tensors: list[Any], default: Any) -> list[Any]:
        """``fn(store, keys, tensors)`` on the store's loop; every key ``default`` if the store
        failed as a whole (a key's own failure is handled, and logged, by ``fn``)."""
        try:
            result: list[Any] = self.store.call(lambda store: fn(store, keys, tensors))
            return result
        except LmtierError as exc:
            log.error("lmtier HiCache storage: %s", exc)
            return [default] * len(keys)


async def get_all(
    store: TieredStore, keys: list[str], outs: list[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    gets = (_get_one(store, key, out) for key, out in zip(keys, outs, strict=True))
    return list(await asyncio.gather(*gets))


async def _get_one(store: TieredStore, key: str, out: torch.Tensor | None) -> torch.Tensor | None:
    try:
        if out is None:
            return await store.get(key, "cpu")
        return await store.get(key, out=out)
    except LmtierError as exc:  # e.g. a page of another shape: a miss, never wrong data
        log.warning("lmtier get %r: %s", key, exc)
        return None


async def put_all(store: TieredStore, keys: list[str], pages: list[torch.Tensor]) -> list[bool]:
    puts = (_put_one(store, key, page) for key, page in zip(keys, pages, strict=True))
    return list(await asyncio.gather(*puts))


async def _put_one(store: TieredStore, key: str, page: torch.Tensor) -> bool:
    try:
        # A page's key names its tokens and their whole prefix: a stored one is already right.
        if await store.contains(key) is not None:
            return True
        return await store.put(key, page) is PutStatus.LEGAL
    except LmtierError as exc:
        log.warning("lmtier put %r: %s", key, exc)
        return False


async def leading_hits(store: TieredStore, keys: list[str]) -> int:
    held = [await store.contains(key) is not None for key in keys]
    count = held.index(False) if False in held else len(keys)
    if count == len(keys) or not any(info.shared for info in store.tier_infos()):
        return count
    # What no index holds may be on the shared tier, stored by another instance: one get_many
    # asks the server for all of it in one round trip (the tier batches the commands of one
    # turn).  A page found is indexed here (and promoted), so the prefetch that follows reads
    # it without asking again.
    asked = [key for key, here in zip(keys[count:], held[count:], strict=True) if not here]
    got = await store.get_many(asked, "cpu")
    found = {key for key, data in zip(asked, got, strict=True) if data is not None}
    for key, here in zip(keys[count:], held[count:], strict=True):
        if not (here or key in found):
            break
        count += 1
    return count


async def delete_suffixed(store: TieredStore, suffixes: tuple[str, ...]) -> int:
    held = store.keys()  # the index's keys: no I/O
    keys = {key for key in held if isinstance(key, str) and key.endswith(suffixes)}
    removed = sum(await asyncio.gather(*(store.delete(key) for key in keys)))
    # A shared tier's server names a value by a digest of its key: what other instances
    # stored there is found by the namespace's key prefix alone, every model's and rank's.
    return removed + await store.clear_shared()
