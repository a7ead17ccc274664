"""The store and load jobs of the vLLM secondary tier, as they run on the store's thread.

Kept apart from the tier (``lmtier.integrations.vllm``), which runs in vLLM's scheduler and
only submits: here a job moves rows between the primary tier and the store in batches, keeps
the key index in step with what each put and get found, pins what a load has still to read,
and queues exactly one ``JobResult`` per job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from vllm.v1.kv_offload.base import OffloadKey
from vllm.v1.kv_offload.tiering.base import JobResult

from lmtier.evictor import PutStatus
from lmtier.integrations.vllm_keys import KeyIndex, offload_key_text
from lmtier.integrations.vllm_metrics import Counters
from lmtier.store import TieredStore

__all__ = ["JobRunner", "job_result"]

# The integration's logger: its lines keep the name users filter on.
log = logging.getLogger("lmtier.integrations.vllm")

_RESULT_FIELDS = frozenset(f.name for f in dataclasses.fields(JobResult))


def job_result(job_id: int, success: bool, **extra: Any) -> JobResult:
    """A JobResult with the optional fields this vLLM release has (older ones lack some)."""
    known = {name: value for name, value in extra.items() if name in _RESULT_FIELDS}
    return JobResult(job_id=job_id, success=success, **known)


class JobRunner:
    """Runs one tier's jobs on the store's thread and queues their results."""

    def __init__(
        self,
        store: TieredStore,
        row: Callable[[int], torch.Tensor],
        row_bytes: int,
        batch: int,
        index: KeyIndex,
        counters: Counters,
        finished: deque[JobResult],
        on_idle: Callable[[], None],
    ) -> None:
        self.store = store
        self._row = row
        self._row_bytes = row_bytes
        self._batch = batch
        self._index = index
        self._counters = counters
        self._finished = finished
        self._on_idle = on_idle
        self._running = 0  # on the store's thread only

    def _job_ended(self) -> None:
        """On the store's thread, before a job's result is queued."""
        self._running -= 1
        if self._running == 0:
            self._on_idle()

    async def store_job(self, job_id: int, todo: list[tuple[str, int]]) -> None:
        started = time.monotonic()
        stored = 0
        self._running += 1
        try:
            for first in range(0, len(todo), self._batch):
                batch = todo[first : first + self._batch]
                done = await asyncio.gather(*(self._put(key, slot) for key, slot in batch))
                stored += sum(done)
        except Exception:
            log.exception("lmtier store job %d failed", job_id)
        self._counters.stored += stored
        self._counters.store_failed += len(todo) - stored
        self._job_ended()
        self._finished.append(
            job_result(
                job_id,
                stored == len(todo),
                transfer_time=time.monotonic() - started,
                transfer_bytes=stored * self._row_bytes,
            )
        )

    async def _put(self, key: str, slot: int) -> bool:
        status = await self.store.put(key, self._row(slot))
        # Indexed only if a tier still holds it now: a later put of the same batch may have
        # evicted it already (its on_drop then found nothing to remove).  From here on, on_drop
        # runs on this same thread, after this.
        if status is PutStatus.LEGAL and self.store.holder(key) is not None:
            self._index.add_all([key])
        return status is PutStatus.LEGAL

    async def load_job(self, job_id: int, pairs: list[tuple[OffloadKey, int]]) -> None:
        started = time.monotonic()
        self._running += 1
        loaded: list[OffloadKey] = []
        texts = [offload_key_text(key) for key, _ in pairs]
        # Every block of the job is pinned until its own read ends: the promotions of its
        # first blocks may then evict anything but the blocks it has still to read.
        pinned = [False] * len(texts)

        async def read(index: int, slot: int) -> torch.Tensor | None:
            try:
                return await self.store.get(texts[index], out=self._row(slot))
            finally:
                if pinned[index]:
                    pinned[index] = False
                    self.store.unpin(texts[index])

        try:
            for index, text in enumerate(texts):
                pinned[index] = self.store.pin(text) is not None
            for first in range(0, len(pairs), self._batch):
                batch = pairs[first : first + self._batch]
                got = await asyncio.gather(
                    *(read(first + i, slot) for i, (_, slot) in enumerate(batch)),
                    return_exceptions=True,
                )
                for text, (key, _), value in zip(texts[first:], batch, got, strict=False):
                    if isinstance(value, torch.Tensor):
                        loaded.append(key)
                        continue
                    if isinstance(value, BaseException):
                        log.warning("lmtier could not load %s: %r", text, value)
                    # Gone, corrupt or unreadable: no longer a hit here.
                    self._index.discard(text)
        except Exception:
            log.exception("lmtier load job %d failed", job_id)
        finally:
            for text, held in zip(texts, pinned, strict=True):
                if held:  # the reads that never ran (a failed or cancelled job)
                    self.store.unpin(text)
        self._counters.loaded += len(loaded)
        self._counters.load_failed += len(pairs) - len(loaded)
        self._job_ended()
        success = len(loaded) == len(pairs)
        self._finished.append(
            job_result(
                job_id,
                success,
                successful_keys=None if success else loaded,
                transfer_time=time.monotonic() - started,
                transfer_bytes=len(loaded) * self._row_bytes,
            )
        )
