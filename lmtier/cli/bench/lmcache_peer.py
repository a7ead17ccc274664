"""LMCache 0.5.6's LocalCPUBackend and LocalDiskBackend, loaded from a folder of their own, and a
small facade over them for the ``--peers`` rows (``lmtier.cli.bench.peers``).

LMCache is an optional peer, installed apart from lmtier's environment by
``scripts/install_peers.sh`` (``pip install --no-deps --target`` of lmcache 0.5.6 and the few
packages its ``LocalCPUBackend`` and ``LocalDiskBackend`` import).  Its folder is appended to
``sys.path`` (after site-packages, so the environment's torch and numpy win): the folder named
by ``$LMCACHE_PEER_SITE``, else ``~/.cache/lmtier/peers-site``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import os
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["LMCACHE_VERSION", "Peer", "kv_shape", "peer", "peers_available", "peers_site"]

LMCACHE_VERSION = "0.5.6"
GB = 1024**3
TOKENS = 256
HIDDEN = 1024
WRITE_TIMEOUT_S = 120.0

_loaded: dict[str, Any] = {}
_failure: list[str] = []


def peers_site() -> Path:
    """The folder ``scripts/install_peers.sh`` installs LMCache into (and this module reads)."""
    named = os.environ.get("LMCACHE_PEER_SITE")
    if named:
        return Path(named).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lmtier" / "peers-site"


def _import_lmcache() -> dict[str, Any]:
    """Import LocalCPUBackend, LocalDiskBackend and what building them takes; raise on failure.

    ``lmcache.v1.storage_backend``'s ``__init__`` also imports the GDS, P2P and remote backends
    (and through them transformers and more); a bare package module stands in for it, so only
    the two local backend modules and their own imports load.
    """
    if _loaded:
        return _loaded
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError(f"lmcache {LMCACHE_VERSION} ships cp311 wheels only; this is "
                           f"Python {sys.version_info[0]}.{sys.version_info[1]}")  # fmt: skip
    site = str(peers_site())
    if Path(site).is_dir() and site not in sys.path:
        sys.path.append(site)  # after site-packages: the environment's torch and numpy win
    importlib.invalidate_caches()
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
    try:
        version = importlib.metadata.version("lmcache")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"lmcache is not installed (looked in site-packages and {site}; "
                           "run scripts/install_peers.sh)") from None  # fmt: skip
    if version != LMCACHE_VERSION:
        raise RuntimeError(f"lmcache {version} is installed; these rows need {LMCACHE_VERSION}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # requests' optional charset detector, numba notes
        lmcache_v1 = importlib.import_module("lmcache.v1")
        package = "lmcache.v1.storage_backend"
        if package not in sys.modules:
            stand_in = types.ModuleType(package)
            stand_in.__path__ = [str(Path(str(lmcache_v1.__file__)).parent / "storage_backend")]
            sys.modules[package] = stand_in
        cpu = importlib.import_module(f"{package}.local_cpu_backend")
        disk = importlib.import_module(f"{package}.local_disk_backend")
        config = importlib.import_module("lmcache.v1.config")
        metadata = importlib.import_module("lmcache.v1.metadata")
        utils = importlib.import_module("lmcache.utils")
    _loaded.update(
        LocalCPUBackend=cpu.LocalCPUBackend,
        LocalDiskBackend=disk.LocalDiskBackend,
        LMCacheEngineConfig=config.LMCacheEngineConfig,
        LMCacheMetadata=metadata.LMCacheMetadata,
        CacheEngineKey=utils.CacheEngineKey,
    )
    return _loaded


def peers_available() -> str | None:
    """None when LMCache 0.5.6's local backends import here, else why not (one line)."""
    if _loaded:
        return None
    if _failure:
        return _failure[0]
    try:
        _import_lmcache()
    except Exception as exc:  # anything on the import chain: missing package, ABI, CUDA ops
        where = ""
        tb = exc.__traceback__
        while tb is not None:  # the deepest lmcache frame names the import that failed
            name = tb.tb_frame.f_code.co_filename
            if f"{os.sep}lmcache{os.sep}" in name:
                where = f" (at {name.split(os.sep + 'lmcache' + os.sep)[-1]}:{tb.tb_lineno})"
            tb = tb.tb_next
        _failure.append(f"LMCache {LMCACHE_VERSION} unusable: {type(exc).__name__}: {exc}{where}")
        return _failure[0]
    return None


def kv_shape(nbytes: int) -> torch.Size:
    """One bfloat16 KV chunk of ``nbytes`` shaped as LMCache's ``KV_2LTD`` (2, layers, 256
    tokens, 1024 hidden) when ``nbytes`` is a whole number of MiB, else flat."""
    per_layer = 2 * TOKENS * HIDDEN * 2  # K and V, bfloat16: 1 MiB
    if nbytes % per_layer == 0:
        return torch.Size([2, nbytes // per_layer, TOKENS, HIDDEN])
    if nbytes % 2:
        raise ValueError(f"nbytes must be even (bfloat16 chunks), got {nbytes}")
    return torch.Size([nbytes // 2])


class Peer:
    """LMCache's LocalCPUBackend and, over it, its LocalDiskBackend, as its engine builds them;
    each method is one public operation of theirs, as LMCache's storage manager calls it."""

    def __init__(self, nbytes: int, folder: Path, disk_chunks: int) -> None:
        lm = _import_lmcache()
        self.lm = lm
        self.shape = kv_shape(nbytes)
        folder.mkdir(parents=True, exist_ok=True)
        layers = self.shape[1] if len(self.shape) == 4 else 1
        config: Any = lm["LMCacheEngineConfig"].from_defaults(
            chunk_size=TOKENS,
            local_cpu=True,
            max_local_cpu_size=12 * nbytes / GB,  # 4 resident + the ones in flight
            local_disk=str(folder),
            max_local_disk_size=(disk_chunks + 8) * nbytes / GB,
        )
        self.metadata: Any = lm["LMCacheMetadata"](
            model_name="lmtier-bench", world_size=1, local_world_size=1, worker_id=0,
            local_worker_id=0, kv_dtype=torch.bfloat16,
            kv_shape=(layers, 2, TOKENS, 1, HIDDEN), chunk_size=TOKENS,
        )  # fmt: skip
        self.loop = asyncio.new_event_loop()  # LocalDiskBackend submits its writes to a loop
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cpu: Any = lm["LocalCPUBackend"](config, metadata=self.metadata, dst_device="cpu")
        self.disk: Any = lm["LocalDiskBackend"](
            config, self.loop, self.cpu, dst_device="cpu", metadata=self.metadata
        )
        self.hashes = iter(range(1, 1 << 62))

    def key(self) -> Any:
        return self.lm["CacheEngineKey"]("lmtier-bench", 1, 0, next(self.hashes), torch.bfloat16)

    def filled(self, src: torch.Tensor) -> Any:
        """A MemoryObj from the CPU backend holding ``src``: what a put hands to a backend."""
        obj = self.cpu.allocate(self.shape, torch.bfloat16)
        if obj is None:
            raise RuntimeError("LMCache LocalCPUBackend could not allocate a chunk")
        obj.tensor.copy_(src)
        return obj

    def cpu_put(self, key: Any, src: torch.Tensor) -> None:
        obj = self.filled(src)
        self.cpu.submit_put_task(key, obj)
        obj.ref_count_down()  # the hot cache holds its own reference, as after a store

    def cpu_get(self, key: Any, out: torch.Tensor) -> None:
        """get_blocking hands out a reference; a caller copies it out to use it, as LMCache's
        GPU connector does."""
        obj = self.cpu.get_blocking(key)
        out.copy_(obj.tensor)
        obj.ref_count_down()

    def disk_put(self, key: Any, obj: Any) -> None:
        """submit_put_task, waited for through its on_complete_callback, which LMCache calls
        once the file is written (on its disk worker threads) and the key indexed."""
        done = threading.Event()
        self.disk.submit_put_task(key, obj, on_complete_callback=lambda _key: done.set())
        if not done.wait(WRITE_TIMEOUT_S):
            raise RuntimeError("LMCache LocalDiskBackend write did not complete")

    def disk_get(self, key: Any) -> Any:
        """get_blocking: allocates from the CPU backend and reads the file into it."""
        obj = self.disk.get_blocking(key)
        if obj is None:
            raise RuntimeError("LMCache LocalDiskBackend lost a chunk it had written")
        return obj

    def close(self) -> None:
        try:
            self.disk.close()
            self.cpu.close()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


@contextmanager
def peer(nbytes: int, folder: Path, disk_chunks: int) -> Iterator[Peer]:
    """A Peer for chunks of ``nbytes`` writing under ``folder``, closed on exit."""
    made = Peer(nbytes, folder, disk_chunks)
    try:
        yield made
    finally:
        made.close()
