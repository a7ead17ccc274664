"""The SGLang HiCache backend's pages kept in an lmtier server (``"server"`` in extra_config).

No store runs in SGLang's process: each batch is one job of a ``ServerClient``, and the page
bytes pass through a shared staging region that the server reads and writes in its own process.
For a set, the pages are copied into the region (torch ``copy_``, which releases the GIL) and a
store job is sent and waited for; for a get, a load job fills the region and the pages are
copied out into the host pool's pages.  These copies run on SGLang's prefetch and backup
threads, never on its scheduler's.

Staging regions: each caller takes one for its batch and gives it back after.  A region is
made the first time a caller finds none free, sized for ``STAGING_PAGES`` pages (SGLang's own
batch, 128 pages: 128 x the page's bytes, 64-byte aligned), or for the batch if that is more;
a free region too small for a batch is replaced by one that fits it.  SGLang's prefetch and
backup threads each hold one at a time, so a process keeps about two.  A region whose job did
not finish cleanly (a server that died, a reply that timed out) is unmapped, never reused: a
server still running that job may yet read or write it.

A server that is down or goes away: gets miss, sets report failure, nothing raises into SGLang,
and no bytes of an unfinished job are ever read; a later call connects again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch

from lmtier.errors import LmtierError
from lmtier.integrations.activity import ActivityReporter
from lmtier.integrations.server_activity import ServerActivity
from lmtier.server import ServerClient, SharedRegion
from lmtier.server.client_wire import (
    HoldsResult,
    LoadResult,
    StoreResult,
    dtype_from_name,
    dtype_name,
    layout,
)
from lmtier.server.protocol import Found

__all__ = ["STAGING_PAGES", "ServerPages", "StagingRegions"]

# The backend's logger: its lines keep the name users filter on.
log = logging.getLogger("lmtier.integrations.sglang")
_Result = TypeVar("_Result", LoadResult, StoreResult)

#: Pages a staging region holds at first: SGLang's STORAGE_BATCH_SIZE, its prefetch and
#: backup batch.
STAGING_PAGES = 128
# The room a get gives a page whose size it does not know (no target): a larger one is read
# again with its own size.
_FIRST_SLOT_BYTES = 1 << 20


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class StagingRegions:
    """The shared regions a ``ServerClient``'s batches pass through, one per caller at a time."""

    def __init__(self, client: ServerClient) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._free: list[SharedRegion] = []

    def take(self, nbytes: int, page_bytes: int) -> SharedRegion:
        """A region of at least ``nbytes`` that no other caller uses until ``give_back``."""
        with self._lock:
            fits = [region for region in self._free if region.size >= nbytes]
            if fits:
                region = min(fits, key=lambda region: region.size)
                self._free.remove(region)
                return region
            too_small = self._free.pop() if self._free else None
        if too_small is not None:
            self.client.unmap_region(too_small)
        return self.client.map_region(max(nbytes, STAGING_PAGES * page_bytes, 1))

    def give_back(self, region: SharedRegion, clean: bool) -> None:
        """Free ``region`` for the next batch if its job ``clean``-ly finished, else unmap it."""
        if clean:
            with self._lock:
                self._free.append(region)
        else:
            self.client.unmap_region(region)

    def sizes(self) -> list[int]:
        """The free regions' sizes."""
        with self._lock:
            return [region.size for region in self._free]

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for region in free:
            self.client.unmap_region(region)


class ServerPages:
    """``PageMover`` through an lmtier server at ``socket_path``; ``reporter`` (if any) writes
    the activity line, with the server's tiers.

    ``clear`` deletes the keys this backend stored or found on the server since it started
    (the server offers no deletion by key suffix): entries of the same model and rank that
    another process stored and this one never touched stay.
    """

    def __init__(
        self, socket_path: str | os.PathLike[str] | None, reporter: ActivityReporter | None
    ) -> None:
        self.client = ServerClient(socket_path)
        self.staging = StagingRegions(self.client)
        self._known_lock = threading.Lock()
        self._known: set[str] = set()  # keys stored or found here: what clear deletes
        self._closed = False
        self._activity = ServerActivity(reporter, self.client) if reporter is not None else None

    # ------------------------------------------------------------------ PageMover
    def get_all(
        self, keys: list[str], outs: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        results: list[torch.Tensor | None] = [None] * len(keys)
        if self._closed or not keys:
            return results
        rooms = {
            i: _FIRST_SLOT_BYTES if out is None else _nbytes(out) for i, out in enumerate(outs)
        }
        page_bytes = max((_nbytes(out) for out in outs if out is not None), default=0)
        try:
            while rooms:  # a second round only for the pages larger than their first room
                rooms = self._load(keys, outs, rooms, results, page_bytes)
        except (LmtierError, OSError) as exc:
            log.error("lmtier HiCache storage: loading from the server failed: %s", exc)
            return [None] * len(keys)
        self._remember(key for key, result in zip(keys, results, strict=True) if result is not None)
        return results

    def _load(
        self,
        keys: list[str],
        outs: Sequence[torch.Tensor | None],
        rooms: dict[int, int],
        results: list[torch.Tensor | None],
        page_bytes: int,
    ) -> dict[int, int]:
        """One load job for the keys of ``rooms``; fills ``results``; the rooms of the pages
        (of no target) that did not fit."""
        indexes = list(rooms)
        offsets, total = layout(rooms[i] for i in indexes)
        region = self.staging.take(total, page_bytes)
        clean = False
        try:
            job = self.client.submit_load(
                [keys[i] for i in indexes], region, offsets, [rooms[i] for i in indexes]
            )
            result = self._waited(job, LoadResult, len(indexes), "missed")
            clean = result.error is None
            if not clean:
                return {}
            again: dict[int, int] = {}
            for i, offset, found in zip(indexes, offsets, result.found, strict=True):
                if found is None:
                    continue
                out = outs[i]
                if out is None:
                    if not found.copied:
                        again[i] = found.nbytes
                        continue
                    data = region.view(offset, found.nbytes).clone()
                    results[i] = data.view(dtype_from_name(found.dtype)).reshape(found.shape)
                elif _fits(found, out, keys[i]):
                    page = region.view(offset, found.nbytes).view(out.dtype).view(out.shape)
                    out.copy_(page)
                    results[i] = out
            return again
        finally:
            self.staging.give_back(region, clean)

    def put_all(self, keys: list[str], pages: list[torch.Tensor]) -> list[bool]:
        if self._closed or not keys:
            return [False] * len(keys)
        try:
            held = self._held(keys)
            new = [i for i, tier in enumerate(held) if tier is None]
            placed = [tier is not None for tier in held]  # a stored page is already right
            if new:
                done = self._store([keys[i] for i in new], [pages[i] for i in new])
                for i, stored in zip(new, done, strict=True):
                    placed[i] = stored
        except (LmtierError, OSError) as exc:
            log.error("lmtier HiCache storage: storing on the server failed: %s", exc)
            return [False] * len(keys)
        self._remember(key for key, done in zip(keys, placed, strict=True) if done)
        return placed

    def _store(self, keys: list[str], pages: list[torch.Tensor]) -> list[bool]:
        sizes = [_nbytes(page) for page in pages]
        offsets, total = layout(sizes)
        region = self.staging.take(total, max(sizes))
        clean = False
        try:
            for page, offset, size in zip(pages, offsets, sizes, strict=True):
                region.view(offset, size).view(page.dtype).view(page.shape).copy_(page)
            job = self.client.submit_store(
                keys,
                region,
                offsets,
                sizes,
                dtypes=[page.dtype for page in pages],
                shapes=[page.shape for page in pages],
            )
            result = self._waited(job, StoreResult, len(keys), "not stored")
            clean = result.error is None
            return list(result.placed)
        finally:
            self.staging.give_back(region, clean)

    def _waited(self, job: int, kind: type[_Result], pages: int, failed: str) -> _Result:
        """Job ``job``'s result, with a warning when it failed as a whole (its ``error``)."""
        result = self.client.wait(job)
        assert isinstance(result, kind)
        if result.error is not None:
            log.warning("lmtier HiCache storage: %d pages %s: %s", pages, failed, result.error)
        return result

    def leading_hits(self, keys: list[str]) -> int:
        if self._closed or not keys:
            return 0
        try:
            held = self._held(keys)
        except (LmtierError, OSError) as exc:
            log.warning("lmtier batch_exists failed: %s", exc)
            return 0
        count = held.index(None) if None in held else len(keys)
        self._remember(keys[:count])
        return count

    def _held(self, keys: list[str]) -> list[str | None]:
        """Which tier of the server holds each key; LmtierError if the job failed (a server
        that is down holds nothing, and a set must not store blindly on that answer)."""
        result = self.client.wait(self.client.submit_holds(keys))
        assert isinstance(result, HoldsResult)
        if result.error is not None:
            raise LmtierError(result.error)
        return list(result.tiers)

    def clear(self, suffixes: tuple[str, ...]) -> bool:
        if self._closed:
            return False
        with self._known_lock:
            keys = [key for key in self._known if key.endswith(suffixes)]
        try:
            removed = asyncio.run(self._delete(keys))
        except (LmtierError, OSError, RuntimeError) as exc:
            log.error("lmtier clear failed: %s", exc)
            return False
        with self._known_lock:
            self._known.difference_update(keys)
        log.info("lmtier HiCache storage cleared on the server: %d entries", removed)
        return True

    async def _delete(self, keys: list[str]) -> int:
        return sum(await asyncio.gather(*(self.client.delete(key) for key in keys)))

    def stats(self) -> dict[str, Any]:
        """The server's store's ``stats()``: every client's entries, not this backend's alone."""
        store: dict[str, Any] = self.client.server_stats()["store"]
        return store

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._activity is not None:
            self._activity.stop()
        self.staging.close()
        self.client.close()

    def _remember(self, keys: Iterable[str]) -> None:
        with self._known_lock:
            self._known.update(keys)


def _fits(found: Found, out: torch.Tensor, key: str) -> bool:
    """Whether the stored page is ``out``'s kind of page (else a miss: another layout's)."""
    if (
        found.copied
        and found.nbytes == _nbytes(out)
        and found.dtype == dtype_name(out.dtype)
        and list(found.shape) == list(out.shape)
    ):
        return True
    log.warning(
        "lmtier get %r: the server holds a %s page of shape %s (%d bytes), not %s %s: a miss",
        key,
        found.dtype,
        list(found.shape),
        found.nbytes,
        dtype_name(out.dtype),
        list(out.shape),
    )
    return False
