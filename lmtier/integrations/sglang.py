"""SGLang HiCache L3 storage backend on lmtier (SGLang 0.5.23's ``HiCacheStorage``).

Loaded by SGLang's ``StorageBackendFactory`` as a "dynamic" backend::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "lmtier",
        "module_path": "lmtier.integrations.sglang", "class_name": "LmtierHiCacheStorage",
        "config_path": "/etc/lmtier/cpu_disk.yaml", "interface_v1": 1}'

The factory calls ``LmtierHiCacheStorage(storage_config, kwargs)`` and the cache controller then
calls ``register_mem_pool_host(host_pool)``; with ``"interface_v1": 1`` it moves pages with
``batch_get_v1``/``batch_set_v1`` (straight between lmtier and the host pool's pages), else with
``batch_get``/``batch_set`` on flat page copies.  Both store the same entries.

extra_config keys read here: ``config_path`` (an lmtier YAML file) or ``config`` (the same
content inline); with neither, ``$LMTIER_CONFIG``.  ``rank_dirs`` (default true) gives each rank
its own sub-folder of every disk tier's path, since a disk folder belongs to one store.

``"server": true`` (this user's default socket) or ``"server": "/path/to/socket"`` keeps the
pages in an lmtier server (``lmtier serve``) instead: no store runs in SGLang's process, and
several SGLang processes share the server's tiers (``sglang_server``).  The server reads its
own config and owns its folders: ``config_path`` (else ``$LMTIER_CONFIG``) is only the config
a server is started with when none answers (``lmtier.server.launch``), and ``config`` and
``rank_dirs`` do not apply; ``report_interval_s`` (60 s by default) sets the activity line's
interval.

Keys carry the model and rank suffixes of SGLang's own file backend (``HiCacheFile``), so another
model, or another shard of the same model, never hits.  Instances share through a redis tier:
``batch_exists`` asks it for the pages no index here holds, and ``clear`` deletes what is under
the store's key prefix there.  Pages are stored in the host pool's page
shape; a page stored under another layout has another shape and reads as a miss.

The key suffixes and config parsing live in ``sglang_config``; the batch operations run on the
store's loop in ``sglang_ops``, or through a server client in ``sglang_server``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from lmtier.integrations.activity import Activity, ActivityReporter, show_lmtier_logs
from lmtier.integrations.blocking import BlockingStore
from lmtier.integrations.sglang_config import (
    MAMBA_SUFFIX,
    key_suffixes,
    report_interval,
    server_socket,
    store_config,
)
from lmtier.integrations.sglang_ops import PageMover, StorePages
from lmtier.integrations.sglang_server import ServerPages
from lmtier.server.launch import ensure_server

__all__ = ["LmtierHiCacheStorage"]

log = logging.getLogger(__name__)


class LmtierHiCacheStorage(HiCacheStorage):  # type: ignore[misc]
    """HiCache's L3 tier kept in a ``TieredStore`` (memory -> disk -> redis, as configured): one
    of its own, or an lmtier server's with ``"server"`` in extra_config (see the module
    docstring)."""

    def __init__(
        self, storage_config: HiCacheStorageConfig, kwargs: Mapping[str, Any] | Any = None
    ) -> None:
        show_lmtier_logs()
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        self.config_suffix, self.tp_config_suffix = key_suffixes(storage_config)
        self.mem_pool_host: Any = None
        self._page_shape: tuple[int, ...] | None = None  # the host pool's page, as stored
        self._pages_are_views = True  # get_data_page(flat=False) is a view into the pool
        self._metrics_lock = threading.Lock()
        self._metrics: dict[str, list[float]] = {
            "prefetch_pgs": [],
            "backup_pgs": [],
            "prefetch_bandwidth": [],
            "backup_bandwidth": [],
        }
        self._activity = Activity()
        self._activity_lock = threading.Lock()  # SGLang's prefetch and backup threads count
        label = f"lmtier HiCache storage tp{storage_config.tp_rank}"
        socket_path = server_socket(extra)
        self._store: BlockingStore | None = None  # the store of its own, without a server
        self._pages: PageMover
        if socket_path is not None:
            interval = report_interval(extra)
            reporter = ActivityReporter(label, self._activity_now, interval) if interval else None
            start_with = extra.get("config_path") or os.environ.get("LMTIER_CONFIG")
            if start_with:
                ensure_server(socket_path, start_with)
            self._pages = ServerPages(socket_path, reporter)
            log.info(
                "lmtier HiCache storage: the server at %s, keys suffixed %r",
                socket_path,
                self.config_suffix,
            )
        else:
            config = store_config(extra, storage_config)
            self._store = BlockingStore(
                config, thread_name=f"lmtier-hicache-tp{storage_config.tp_rank}"
            )
            self._pages = StorePages(self._store)
            log.info(
                "lmtier HiCache storage: tiers %s, keys suffixed %r",
                [info.name for info in self._store.store.tier_infos()],
                self.config_suffix,
            )
            if config.report_interval_s > 0:
                interval = config.report_interval_s
                ActivityReporter(label, self._activity_now, interval).start(self._store)
        # The built-in constructors' shape, (storage_config, mem_pool_host), works too.
        if kwargs is not None and not isinstance(kwargs, Mapping):
            self.register_mem_pool_host(kwargs)

    # ------------------------------------------------------------------ host pool
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        try:
            page = mem_pool_host.get_data_page(0, flat=False)
        except Exception:
            log.warning("host pool %r gives no page view: pages are stored flat", mem_pool_host)
            self._page_shape = None
            return
        self._page_shape = tuple(page.shape)
        self._pages_are_views = bool(page._is_view())

    def _as_page(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a flat page or a page) viewed in the stored page shape where it can be."""
        shape = self._page_shape
        if shape is None or tuple(tensor.shape) == shape:
            return tensor
        if tensor.is_contiguous() and tensor.numel() == _numel(shape):
            return tensor.view(shape)
        return tensor

    def _suffixed(self, key: str) -> str:
        if key.endswith(MAMBA_SUFFIX):
            return key + self.tp_config_suffix
        return key + self.config_suffix

    # ------------------------------------------------------------------ generic path
    def get(
        self,
        key: str,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(
        self,
        keys: list[str],
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> list[torch.Tensor | None]:
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        if len(targets) != len(keys):
            log.error("batch_get: %d keys but %d target locations", len(keys), len(targets))
            return [None] * len(keys)
        began = time.perf_counter()
        outs = [None if target is None else self._as_page(target) for target in targets]
        found = self._pages.get_all([self._suffixed(key) for key in keys], outs)
        results = [
            None if data is None else (target if target is not None else data)
            for data, target in zip(found, targets, strict=True)
        ]
        self._count(loaded=sum(data is not None for data in found), asked=len(keys))
        self._record("prefetch", results, began)
        return results

    def set(
        self,
        key: str,
        value: Any | None = None,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        if value is None:
            log.error("set %r: no value given (target_location alone is not supported)", key)
            return False
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        if values is None:
            log.error("batch_set: no values given (target_locations alone are not supported)")
            return False
        values = list(values)
        if len(values) != len(keys):
            log.error("batch_set: %d keys but %d values", len(keys), len(values))
            return False
        began = time.perf_counter()
        pages = [self._as_page(value) for value in values]
        done = self._pages.put_all([self._suffixed(key) for key in keys], pages)
        self._count(stored=sum(done), offered=len(keys))
        self._record("backup", done, began)
        return all(done)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        """How many of ``keys``, from the first, are stored: the count stops at the first miss."""
        hits = self._pages.leading_hits([self._suffixed(key) for key in keys])
        self._count(lookups=len(keys), hits=hits)  # the pages of the prefix SGLang can use
        return hits

    # ------------------------------------------------------------------ zero-copy path
    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Read each page straight into its host-pool page (one copy from its tier)."""
        located = self._host_pages(keys, host_indices, "batch_get_v1")
        if located is None:
            return [False] * len(keys)
        indices, pages = located
        began = time.perf_counter()
        found = self._pages.get_all([self._suffixed(key) for key in keys], pages)
        hits = [data is not None for data in found]
        self._count(loaded=sum(hits), asked=len(keys))
        if not self._pages_are_views:  # a copy of the page: hand it back to the pool
            for index, page, hit in zip(indices, pages, hits, strict=True):
                if hit:
                    self.mem_pool_host.set_from_flat_data_page(index, page.reshape(-1))
        self._record("prefetch", hits, began)
        return hits

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Store each host-pool page as it lies in the pool (the tier makes the one copy)."""
        located = self._host_pages(keys, host_indices, "batch_set_v1")
        if located is None:
            return [False] * len(keys)
        _, pages = located
        began = time.perf_counter()
        done = self._pages.put_all([self._suffixed(key) for key in keys], pages)
        self._count(stored=sum(done), offered=len(keys))
        self._record("backup", done, began)
        return done

    def _host_pages(
        self, keys: Sequence[str], host_indices: torch.Tensor, what: str
    ) -> tuple[list[int], list[torch.Tensor]] | None:
        pool = self.mem_pool_host
        if pool is None:
            log.error("%s: no host pool registered (register_mem_pool_host)", what)
            return None
        page_size = int(getattr(pool, "page_size", 1) or 1)
        if host_indices.numel() != len(keys) * page_size:
            log.error(
                "%s: %d keys need %d host indices, got %d",
                what,
                len(keys),
                len(keys) * page_size,
                host_indices.numel(),
            )
            return None
        firsts = host_indices[::page_size].tolist()
        indices = [int(index) for index in firsts]
        return indices, [pool.get_data_page(index, flat=False) for index in indices]

    # ------------------------------------------------------------------ the rest
    def clear(self) -> bool:
        """Delete this backend's entries (this model's and rank's keys) from every tier, and
        every value on a shared (redis) tier under the store's key prefix: all the entries of
        this lmtier namespace there, whichever model, rank or instance stored them (give each
        model its own ``namespace`` or ``key_prefix`` to keep a clear to one model).  On a
        server, the keys this backend stored or found there since it started (``ServerPages``)."""
        return self._pages.clear((self.config_suffix, self.tp_config_suffix))

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` of the transfers since the last call, when storage
        metrics are on (None otherwise); ``lmtier_stats()`` gives the store's own counters."""
        if not self.storage_config.enable_storage_metrics:
            return None
        storage_metrics = _storage_metrics_class()
        if storage_metrics is None:
            return None
        metrics = storage_metrics()
        with self._metrics_lock:
            for name, values in self._metrics.items():
                getattr(metrics, name).extend(values)
                values.clear()
        return metrics

    def lmtier_stats(self) -> dict[str, Any]:
        """The store's ``stats()`` (on a server: the server's whole store)."""
        return self._pages.stats()

    def close(self) -> None:
        """Finish the transfers in flight and close the store (or the server connection);
        later calls do nothing."""
        self._pages.close()

    # ------------------------------------------------------------------ helpers
    def _count(
        self,
        *,
        lookups: int = 0,
        hits: int = 0,
        stored: int = 0,
        offered: int = 0,
        loaded: int = 0,
        asked: int = 0,
    ) -> None:
        with self._activity_lock:
            activity = self._activity
            activity.lookups += lookups
            activity.hits += hits
            activity.stored += stored
            activity.store_failed += offered - stored
            activity.loaded += loaded
            activity.load_failed += asked - loaded

    def _activity_now(self) -> Activity:
        with self._activity_lock:
            return dataclasses.replace(self._activity)

    def _record(self, direction: str, results: Sequence[object], began: float) -> None:
        if not self.storage_config.enable_storage_metrics:
            return
        pages = sum(1 for result in results if result is not None and result is not False)
        seconds = time.perf_counter() - began
        page_bytes = 0
        if self._page_shape is not None and self.mem_pool_host is not None:
            itemsize = torch.empty((), dtype=self.mem_pool_host.dtype).element_size()
            page_bytes = _numel(self._page_shape) * itemsize
        with self._metrics_lock:
            self._metrics[f"{direction}_pgs"].append(pages)
            if seconds > 0 and page_bytes:
                self._metrics[f"{direction}_bandwidth"].append(pages * page_bytes / seconds / 1e9)


_METRICS_MODULE = "sglang.srt.observability.metrics_collector"
_metrics_import_failed = False


def _storage_metrics_class() -> Any:
    """SGLang's StorageMetrics, or None where its module cannot be imported (it pulls in
    SGLang's model layers; a server that collects storage metrics has it loaded already)."""
    global _metrics_import_failed
    module = sys.modules.get(_METRICS_MODULE)
    if module is None and not _metrics_import_failed:
        try:
            module = importlib.import_module(_METRICS_MODULE)
        except ImportError as exc:
            _metrics_import_failed = True
            log.warning("SGLang's StorageMetrics is not importable (%s): get_stats gives None", exc)
    return getattr(module, "StorageMetrics", None)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
