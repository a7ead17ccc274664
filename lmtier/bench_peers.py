"""``lmtier bench --peers``: the same chunks through LMCache 0.5.6's local backends, same run.

LMCache is an optional peer, installed apart from lmtier's environment by
``scripts/install_peers.sh`` (``pip install --no-deps --target`` of lmcache 0.5.6 and the few
packages its ``LocalCPUBackend`` and ``LocalDiskBackend`` import).  Its folder is appended to
``sys.path`` (after site-packages, so the environment's torch and numpy win): the folder named
by ``$LMCACHE_PEER_SITE``, else ``~/.cache/lmtier/peers-site``.

Rows, each a median of ``repeats`` samples taken alternately with the lmtier side:

- cpu put: ``TieredStore.put`` of a new key into a cpu memory tier, against LMCache's
  ``LocalCPUBackend.allocate`` + ``copy_`` into the ``MemoryObj`` + ``submit_put_task`` (what
  its storage manager does for a put).
- cpu get: ``TieredStore.get(key, out=)`` against ``LocalCPUBackend.get_blocking`` + ``copy_``
  out of the returned ``MemoryObj`` (its get hands out a reference; a caller copies it out to
  use it, as LMCache's GPU connector does).
- disk write: ``DiskTier.write_published`` (xxh3 checksum, header, temp file + rename) against
  ``LocalDiskBackend.submit_put_task`` of a filled ``MemoryObj`` (allocated from its
  ``LocalCPUBackend``), waited for through its ``on_complete_callback``, which it calls once
  the file is written and the key indexed (the write runs on its disk worker threads).
- disk read: ``DiskTier._read_file(meta, out)`` (header check, checksum verified) against
  ``LocalDiskBackend.get_blocking`` (allocates from its ``LocalCPUBackend``, ``readinto``).

Disk writes go to a new file on each side; which side writes first alternates from pair to
pair, and both files are removed (untimed) before the next pair, so neither side always writes
under the other's dirty pages (a fixed order with files left behind favoured lmtier 3-5x at
16 MiB on a 2-core machine).  The bytes are the same on both sides: one bfloat16 KV chunk
shaped as LMCache's ``KV_2LTD`` (2, layers, 256 tokens, 1024 hidden) when ``nbytes`` is a whole
number of MiB.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import os
import shutil
import statistics
import sys
import threading
import time
import types
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lmtier.bench import MiB, Row, _gbs, _store
from lmtier.config import TierConfig
from lmtier.evictor import LRUEvictor
from lmtier.tiers import DiskTier

__all__ = ["LMCACHE_VERSION", "peer_rows", "peers_available", "peers_site"]

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


# ---------------------------------------------------------------------- LMCache side
def _kv_shape(nbytes: int) -> torch.Size:
    per_layer = 2 * TOKENS * HIDDEN * 2  # K and V, bfloat16: 1 MiB
    if nbytes % per_layer == 0:
        return torch.Size([2, nbytes // per_layer, TOKENS, HIDDEN])
    if nbytes % 2:
        raise ValueError(f"nbytes must be even (bfloat16 chunks), got {nbytes}")
    return torch.Size([nbytes // 2])


class _Peer:
    """LMCache's LocalCPUBackend and, over it, its LocalDiskBackend, as its engine builds them."""

    def __init__(self, nbytes: int, folder: Path, disk_chunks: int) -> None:
        lm = _import_lmcache()
        self.lm = lm
        self.shape = _kv_shape(nbytes)
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
        obj = self.cpu.get_blocking(key)
        out.copy_(obj.tensor)
        obj.ref_count_down()

    def disk_put(self, key: Any, obj: Any) -> None:
        done = threading.Event()
        self.disk.submit_put_task(key, obj, on_complete_callback=lambda _key: done.set())
        if not done.wait(WRITE_TIMEOUT_S):
            raise RuntimeError("LMCache LocalDiskBackend write did not complete")

    def disk_get(self, key: Any) -> Any:
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
def _peer(nbytes: int, folder: Path, disk_chunks: int) -> Iterator[_Peer]:
    peer = _Peer(nbytes, folder, disk_chunks)
    try:
        yield peer
    finally:
        peer.close()


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    # random bytes make NaNs in bfloat16, and NaN != NaN: compare the bytes
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# ---------------------------------------------------------------------- rows
def _cpu_rows(nbytes: int, repeats: int, src: torch.Tensor, peer: _Peer) -> list[Row]:
    out = torch.empty_like(src)

    async def lmtier_side() -> tuple[list[float], list[float]]:
        put_s, get_s = [], []
        async with _store(TierConfig("cpu", "memory", 8 * nbytes)) as store:
            keys: list[str] = []
            peer_keys: list[Any] = []
            for turn in range(repeats + 4):
                key, peer_key = f"k{turn}", peer.key()
                started = time.perf_counter()
                await store.put(key, src)
                put = time.perf_counter() - started
                started = time.perf_counter()
                await store.get(key, out=out)
                get = time.perf_counter() - started
                peer_put = _timed(lambda: peer.cpu_put(peer_key, src))  # noqa: B023
                peer_get = _timed(lambda: peer.cpu_get(peer_key, out))  # noqa: B023
                keys.append(key)
                peer_keys.append(peer_key)
                if len(keys) > 4:  # keep 4 resident, deleted outside the timings
                    await store.delete(keys.pop(0))
                    peer.cpu.remove(peer_keys.pop(0))
                if turn >= 4:  # the first puts fill buffer pools on both sides
                    put_s.append(put)
                    get_s.append(get)
                    peer_puts.append(peer_put)
                    peer_gets.append(peer_get)
        return put_s, get_s

    peer_puts: list[float] = []
    peer_gets: list[float] = []
    put_s, get_s = asyncio.run(lmtier_side())
    put, get = statistics.median(put_s), statistics.median(get_s)
    peer_put, peer_get = statistics.median(peer_puts), statistics.median(peer_gets)
    size = f"{nbytes // MiB} MiB"
    return [
        Row(f"cpu put {size} vs LMCache LocalCPUBackend", _gbs(nbytes, put),
            _gbs(nbytes, peer_put), peer_put / put),
        Row(f"cpu get(out=) {size} vs LMCache get_blocking+copy_", _gbs(nbytes, get),
            _gbs(nbytes, peer_get), peer_get / get),
    ]  # fmt: skip


def _disk_rows(
    nbytes: int, repeats: int, src: torch.Tensor, peer: _Peer, folder: Path
) -> list[Row]:
    tier = DiskTier("disk", LRUEvictor(max_cache_bytes=1 << 40), folder / "lmtier")
    asyncio.run(tier.open())
    written: list[str] = []
    write_s, peer_write_s = [], []
    try:
        meta = tier.write_published("warm", src)  # first writes make folders and warm both paths
        Path(meta.path).unlink()
        key = peer.key()
        obj = peer.filled(src)
        peer.disk_put(key, obj)
        obj.ref_count_down()
        peer.disk.remove(key)
        for turn in range(repeats):
            key, obj = peer.key(), peer.filled(src)  # its put source: a filled MemoryObj
            sides = [
                lambda: written.append(tier.write_published(f"k{turn}", src).path),  # noqa: B023
                lambda: peer.disk_put(key, obj),  # noqa: B023
            ]
            # alternate which goes first, so writeback of the other's bytes weighs on both alike
            first, second = (0, 1) if turn % 2 == 0 else (1, 0)
            times = {first: _timed(sides[first]), second: _timed(sides[second])}
            write_s.append(times[0])
            peer_write_s.append(times[1])
            obj.ref_count_down()
            # a new file per write on both sides, each removed untimed before the next pair
            Path(written.pop()).unlink()
            peer.disk.remove(key)
        meta = tier.write_published("read", src)  # one entry each to read back, warm in page cache
        written.append(meta.path)
        peer_key, obj = peer.key(), peer.filled(src)
        peer.disk_put(peer_key, obj)
        obj.ref_count_down()
        out = torch.empty_like(src)
        read_s, peer_read_s = [], []
        got: list[Any] = []
        reads = [
            lambda: tier._read_file(meta, out),
            lambda: got.append(peer.disk_get(peer_key)),
        ]
        for turn in range(repeats + 1):  # alternate; the first pair only warms
            first, second = (0, 1) if turn % 2 == 0 else (1, 0)
            times = {first: _timed(reads[first]), second: _timed(reads[second])}
            read_s.append(times[0])
            peer_read_s.append(times[1])
            if not _same_bytes(got[-1].tensor, src):
                raise RuntimeError("LMCache LocalDiskBackend read back different bytes")
            got.pop().ref_count_down()
        if not _same_bytes(out, src):
            raise RuntimeError("lmtier DiskTier read back different bytes")
    finally:
        asyncio.run(tier.close())
        for path in written:
            Path(path).unlink(missing_ok=True)
    write, peer_write = statistics.median(write_s), statistics.median(peer_write_s)
    read, peer_read = statistics.median(read_s[1:]), statistics.median(peer_read_s[1:])
    size = f"{nbytes // MiB} MiB"
    return [
        Row(f"disk write {size} (checksum, rename) vs LMCache LocalDiskBackend",
            _gbs(nbytes, write), _gbs(nbytes, peer_write), peer_write / write, ">= 1.5"),
        Row(f"disk read {size} (checksum) vs LMCache LocalDiskBackend", _gbs(nbytes, read),
            _gbs(nbytes, peer_read), peer_read / read, ">= 1.0"),
    ]  # fmt: skip


def _unavailable_rows(nbytes: int, reason: str) -> list[Row]:
    size = f"{nbytes // MiB} MiB"
    names = [(f"cpu put {size} vs LMCache LocalCPUBackend", ""),
             (f"cpu get(out=) {size} vs LMCache get_blocking+copy_", ""),
             (f"disk write {size} (checksum, rename) vs LMCache LocalDiskBackend", ">= 1.5"),
             (f"disk read {size} (checksum) vs LMCache LocalDiskBackend", ">= 1.0")]  # fmt: skip
    return [Row(name, "", reason, None, goal) for name, goal in names]


def peer_rows(nbytes: int, repeats: int, folder: Path) -> list[Row]:
    """lmtier's cpu and disk tiers beside LMCache 0.5.6's local backends on the same chunk.

    Where LMCache cannot be used here, the rows carry the reason in the baseline column and no
    ratio.  ``folder`` receives both sides' files (in a fresh sub-folder, removed afterwards).
    """
    reason = peers_available()
    if reason is not None:
        return _unavailable_rows(nbytes, reason)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).view(torch.bfloat16)
    src = src.view(_kv_shape(nbytes))
    root = folder / f"peers-{uuid.uuid4().hex[:8]}"
    try:
        with _peer(nbytes, root / "lmcache", repeats + 8) as peer:
            rows = _cpu_rows(nbytes, repeats, src, peer)
            rows += _disk_rows(nbytes, repeats, src, peer, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m lmtier.bench_peers [--repeats N] [--folder DIR] [MiB ...]``."""
    import argparse
    import tempfile

    from lmtier.bench import format_rows

    parser = argparse.ArgumentParser(prog="python -m lmtier.bench_peers")
    parser.add_argument("sizes", nargs="*", type=int, default=[2, 16], help="chunk sizes in MiB")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=args.folder, prefix="lmtier-peers-") as name:
        for mib in args.sizes:
            rows += peer_rows(mib * MiB, args.repeats, Path(name))
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
