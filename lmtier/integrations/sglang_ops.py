"""The SGLang HiCache backend's batch operations, as coroutines on the store's loop.

Kept apart from the backend (``lmtier.integrations.sglang``), which runs on SGLang's threads
and only hands these to the store's loop: each reads, writes, probes or deletes a batch of pages
concurrently, and a page's own failure is logged and answered as a miss, never raised.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from lmtier.errors import LmtierError
from lmtier.evictor import PutStatus
from lmtier.store import TieredStore

__all__ = ["delete_suffixed", "get_all", "leading_hits", "put_all"]

# The backend's logger: its lines keep the name users filter on.
log = logging.getLogger("lmtier.integrations.sglang")


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
