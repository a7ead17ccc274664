"""The vLLM secondary tier as a client of ``lmtier serve``: the tiers live in the server's
process, and the engine's process only looks up, submits and polls.

``LmtierSecondaryTier`` with ``"server": true`` (this user's default socket) or
``"server": "/path/to/socket"`` in its ``secondary_tiers`` entry is this tier::

    {"type": "LmtierSecondaryTier", "module_path": "lmtier.integrations.vllm",
     "server": true, "config_path": "configs/vllm.yaml"}

``config_path`` (else ``$LMTIER_CONFIG``) is the config a server is started with when none
answers on the socket (``lmtier.server.launch``; it keeps running after the engine, for the
next ones); with neither, the engine waits for a server started otherwise, and gets misses
until one answers.

* The primary tier's rows stay where vLLM keeps them, in its shared-memory file: that file
  is handed to the server (``lmtier.server.mapped_files``), and a store or load job is one
  message naming keys and row offsets.  The server reads and writes the rows in place; the
  engine's thread encodes the job, and polls a completion word in shared memory once a step.
* ``lookup`` answers from an in-process set of the keys this tier stored, loaded or was told
  the server holds.  Other engines on the server store keys this set lacks: such a key
  answers RETRY, and is asked for in one ``Holds`` message per step with the step's other
  unknown keys; a later lookup answers HIT or MISS.
* Keys are the in-process tier's, behind a digest of the engine's namespace (the model's
  identity, dtype, block geometry, parallel layout, row size, and ``namespace`` if given),
  so engines of different models share a server and never each other's blocks.
* A server that is down or dies: loads fail (vLLM computes the blocks), stores are not
  placed, lookups of unknown keys answer MISS; never wrong bytes.  The client reconnects
  once a server answers again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm.v1.kv_offload.base import (
    OffloadKey,
    ReqContext,
)
from vllm.v1.kv_offload.tiering.base import JobResult

from lmtier.errors import ConfigError
from lmtier.integrations.activity import ActivityReporter
from lmtier.integrations.server_activity import ServerActivity
from lmtier.integrations.vllm_base import IndexedTier, primary_rows
from lmtier.integrations.vllm_jobs import job_result
from lmtier.integrations.vllm_keys import job_slots, kv_namespace, offload_key_text
from lmtier.server.client import HoldsResult, LoadResult, ServerClient, StoreResult
from lmtier.server.launch import ensure_server
from lmtier.server.mapped_files import mapped_file
from lmtier.server.paths import default_socket_path

__all__ = ["LmtierServerTier"]

log = logging.getLogger("lmtier.integrations.vllm")

#: How often the activity line is written, as the in-process tier's default.
REPORT_INTERVAL_S = 60.0


@dataclass
class _Job:
    """A job sent to the server: vLLM's id (-1: a lookup of the tier's own), the keys it
    names, when it was sent, and a load's vLLM keys (for its ``successful_keys``)."""

    vllm_id: int
    texts: list[str]
    started: float
    keys: list[OffloadKey] | None = None


class LmtierServerTier(IndexedTier):
    """A vLLM secondary tier served by ``lmtier serve`` (see the module docstring)."""

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        server: bool | str = True,
        config_path: str | os.PathLike[str] | None = None,
        namespace: str | None = None,
        model_id: str | None = None,
        probe_shared: bool = True,
        report_interval_s: float = REPORT_INTERVAL_S,
        locality: str | None = None,
        backpressure_detector: Any = None,
        timeout_s: float = 60.0,
    ) -> None:
        super().__init__(
            offloading_spec, primary_kv_view, tier_type, locality, backpressure_detector
        )
        rows = primary_rows(primary_kv_view)
        self._row_bytes = int(rows.shape[1])
        self._row_stride = int(rows.strides[0])
        extent = (rows.shape[0] - 1) * self._row_stride + self._row_bytes
        try:
            shared = mapped_file(rows.ctypes.data, extent)
        except Exception as exc:
            raise ConfigError(
                f"LmtierSecondaryTier with a server needs vLLM's CPU-tier rows in a shared "
                f"file: {exc}"
            ) from exc
        self._first_row = shared.offset

        derived = kv_namespace(offloading_spec, self._row_bytes, model_id)
        self.namespace = f"{namespace}|{derived}" if namespace else derived
        digest = hashlib.blake2b(self.namespace.encode(), digest_size=8).hexdigest()
        self._key_prefix = f"vllm/{digest}/"

        socket_path = default_socket_path() if server is True else Path(str(server))
        config_path = config_path or os.environ.get("LMTIER_CONFIG")
        try:
            if config_path:
                ensure_server(socket_path, config_path)
            self._client = ServerClient(socket_path, timeout=timeout_s)
            self._region = self._client.share_file(shared.fd, shared.offset + extent)
        finally:
            os.close(shared.fd)

        self._probe_shared = probe_shared
        self._to_probe: list[str] = []
        self._jobs: dict[int, _Job] = {}  # by the server's job id
        self._finished: deque[JobResult] = deque()
        self._activity = (
            ServerActivity(
                ActivityReporter(
                    f"lmtier vLLM tier {tier_type!r}", self._counters.activity, report_interval_s
                ),
                self._client,
            )
            if report_interval_s > 0
            else None
        )
        log.info(
            "lmtier secondary tier %r: served by %s, namespace %r", tier_type, socket_path,
            self.namespace,
        )  # fmt: skip

    # ------------------------------------------------------------------ scheduler side
    def on_schedule_end(self, context: Any) -> None:
        self._send_probes()

    def submit_store(self, job_metadata: Any) -> None:
        slots = job_slots(job_metadata)
        texts = [offload_key_text(key) for key in job_metadata.keys]
        if len(texts) != len(slots):
            raise ValueError(
                f"store job {job_metadata.job_id}: {len(texts)} keys, {len(slots)} rows"
            )
        # Blocks this tier already holds are not written again.
        todo = [(text, int(slot)) for text, slot in zip(texts, slots, strict=True)
                if text not in self._index]  # fmt: skip
        if not todo or self._closed:
            self._finished.append(job_result(job_metadata.job_id, not self._closed))
            return
        job = self._client.submit_store(
            [self._key_prefix + text for text, _ in todo],
            self._region,
            [self._offset(slot) for _, slot in todo],
            [self._row_bytes] * len(todo),
        )
        texts_sent = [text for text, _ in todo]
        self._jobs[job] = _Job(job_metadata.job_id, texts_sent, time.monotonic())

    def submit_load(self, job_metadata: Any) -> None:
        slots = job_slots(job_metadata)
        keys = list(job_metadata.keys)
        if len(keys) != len(slots):
            raise ValueError(f"load job {job_metadata.job_id}: {len(keys)} keys, {len(slots)} rows")
        if self._closed:
            self._finished.append(job_result(job_metadata.job_id, False))
            return
        texts = [offload_key_text(key) for key in keys]
        job = self._client.submit_load(
            [self._key_prefix + text for text in texts],
            self._region,
            [self._offset(int(slot)) for slot in slots],
            [self._row_bytes] * len(texts),
        )
        self._jobs[job] = _Job(job_metadata.job_id, texts, time.monotonic(), keys)

    def get_finished_jobs(self) -> Iterable[JobResult]:
        self._send_probes()
        if self._jobs or self._probes.in_flight:
            for result in self._client.poll():
                self._settle(result)
        done = list(self._finished)
        self._finished.clear()
        return done

    get_finished = get_finished_jobs  # the name in older vLLM

    def has_pending_work(self) -> bool:
        return bool(self._jobs) or bool(self._finished) or self._probes.in_flight > 0

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Nothing: the server's evictors see this engine's loads, not its own cache's hits."""

    def drain_jobs(self) -> None:
        """Wait until every submitted job has finished (its result queued)."""
        self._send_probes()
        for job in list(self._jobs):
            self._settle(self._client.wait(job))

    def shutdown(self) -> None:
        """Let jobs in flight finish (the server writes the primary rows), then disconnect."""
        if self._closed:
            return
        self._closed = True
        try:
            self.drain_jobs()
        finally:
            if self._activity is not None:
                self._activity.stop()
            self._client.unmap_region(self._region)
            self._client.close()
            self._index.clear()

    def get_stats(self) -> Any:
        """This tier's block counters since the last call (the server's tiers report on its
        own metrics endpoint)."""
        return self._stats_since_reported([])

    def stats(self) -> dict[str, Any]:
        return {"indexed_keys": len(self._index), "jobs_in_flight": len(self._jobs),
                **self._counters.__dict__}  # fmt: skip

    # ------------------------------------------------------------------ results
    def _start_probe(self, text: str) -> None:
        self._to_probe.append(text)  # sent with the step's others at its end

    def _send_probes(self) -> None:
        if not self._to_probe:
            return
        texts, self._to_probe = self._to_probe, []
        job = self._client.submit_holds([self._key_prefix + text for text in texts])
        self._jobs[job] = _Job(-1, texts, time.monotonic())

    def _settle(self, result: StoreResult | LoadResult | HoldsResult) -> None:
        job = self._jobs.pop(result.job_id, None)
        if job is None:
            return
        if result.error is not None:
            log.warning("lmtier server job failed: %s", result.error)
        if isinstance(result, HoldsResult):
            for text, tier in zip(job.texts, result.tiers, strict=True):
                self._probes.settle(text, tier is not None)
            return
        if isinstance(result, StoreResult):
            placed = [text for text, ok in zip(job.texts, result.placed, strict=True) if ok]
            self._index.add_all(placed)
            self._counters.stored += len(placed)
            self._counters.store_failed += len(job.texts) - len(placed)
            success, loaded, moved = len(placed) == len(job.texts), None, len(placed)
        else:
            assert job.keys is not None
            loaded = []
            for key, text, found in zip(job.keys, job.texts, result.found, strict=True):
                if found is not None and found.copied and found.nbytes == self._row_bytes:
                    loaded.append(key)
                    self._index.add_all([text])
                else:  # gone, corrupt, or the server unreachable: no longer a hit here
                    self._index.discard(text)
            self._counters.loaded += len(loaded)
            self._counters.load_failed += len(job.keys) - len(loaded)
            success, moved = len(loaded) == len(job.keys), len(loaded)
        self._finished.append(
            job_result(
                job.vllm_id,
                success,
                successful_keys=None if success else loaded,
                transfer_time=time.monotonic() - job.started,
                transfer_bytes=moved * self._row_bytes,
            )
        )

    def _offset(self, slot: int) -> int:
        return self._first_row + slot * self._row_stride
