"""What the SGLang backend's tests share: SGLang's factory, its host pool, and pages.

Imported by the tests that need SGLang; where SGLang is not importable the importing module is
skipped, unless REQUIRE_ENGINE_TESTS=1, where a missing SGLang fails the run.
"""

from __future__ import annotations

import os
import random
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
except ImportError as exc:
    if os.environ.get("REQUIRE_ENGINE_TESTS") == "1":
        raise ImportError(f"REQUIRE_ENGINE_TESTS=1 but SGLang is not importable: {exc}") from exc
    pytest.skip(f"SGLang is not importable: {exc}", allow_module_level=True)

from lmtier.integrations.sglang import LmtierHiCacheStorage

__all__ = ["HiCacheStorage"]  # the tests import SGLang's names from here, after the check

try:  # SGLang's real MHA host pool, given its geometry by hand (its __init__ wants a GPU pool)
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    REAL_POOL = True
except Exception:  # pragma: no cover - depends on what the SGLang install can import
    REAL_POOL = False

PAGE_SIZE, LAYERS, HEADS, HEAD_DIM = 4, 2, 2, 8
DTYPE = torch.float16
PAGE_NUMEL = 2 * PAGE_SIZE * LAYERS * HEADS * HEAD_DIM
PAGE_BYTES = PAGE_NUMEL * 2  # 512 B
DYNAMIC = {
    "backend_name": "lmtier",
    "module_path": "lmtier.integrations.sglang",
    "class_name": "LmtierHiCacheStorage",
}


def lmtier_config(root: Path, memory_pages: int = 8, disk_pages: int = 4096) -> dict[str, Any]:
    """A memory tier of a few pages that spills to a disk tier."""
    return {
        "tiers": [
            {
                "name": "cpu",
                "kind": "memory",
                "device": "cpu",
                "max_size_mb": memory_pages * PAGE_BYTES / 2**20,
            },
            {
                "name": "disk",
                "kind": "disk",
                "path": str(root / "l3"),
                "max_size_mb": disk_pages * PAGE_BYTES / 2**20,
            },
        ]
    }


def disk_config(root: Path) -> dict[str, Any]:
    """A disk tier alone: what it holds outlives a close (a memory tier's entries do not)."""
    return {"tiers": [lmtier_config(root)["tiers"][1]]}


def storage_config(
    root: Path,
    model_name: str = "org/model-a",
    tp_rank: int = 0,
    tp_size: int = 1,
    is_mla_model: bool = False,
    metrics: bool = False,
    **extra: Any,
) -> HiCacheStorageConfig:
    extra_config = {**DYNAMIC, **extra}
    if "config_path" not in extra_config:
        extra_config.setdefault("config", lmtier_config(root))
    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=is_mla_model,
        enable_storage_metrics=metrics,
        is_page_first_layout=True,
        model_name=model_name,
        extra_config=extra_config,
    )


def build(config: HiCacheStorageConfig, pool: Any = None) -> Any:
    """The backend as SGLang's cache controller makes it (cache_controller.py: create_backend,
    then register_mem_pool_host)."""
    backend = StorageBackendFactory.create_backend("dynamic", config, pool)
    if pool is not None:
        backend.register_mem_pool_host(pool)
    return backend


def inner(backend: Any) -> LmtierHiCacheStorage:
    return getattr(backend, "_backend", backend)  # unwrap SGLang's test failure injector


def page_for(key: str, version: int = 0) -> torch.Tensor:
    """A flat page whose values follow from the key, so a wrong or stale read shows."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{key}/{version}".encode()))
    return torch.randn(PAGE_NUMEL, generator=generator).to(DTYPE)


class StandInPool:
    """SGLang's MHATokenToKVPoolHost page methods (get_data_page, get_dummy_flat_data_page,
    set_from_flat_data_page), for installs where that class cannot be imported."""

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        if self.layout == "layer_first":
            page = self.kv_buffer[:, :, index : index + self.page_size]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, index : index + self.page_size]
        else:
            real = index // self.page_size
            page = self.kv_buffer[:, real : real + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(PAGE_NUMEL, dtype=self.dtype)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        page = self.get_data_page(index, flat=False)
        page.copy_(data_page.reshape(page.shape))


def host_pool(layout: str, pages: int = 16) -> Any:
    """A host KV pool of ``pages`` pages on the CPU, filled with random values."""
    cls = MHATokenToKVPoolHost if REAL_POOL else StandInPool
    pool = cls.__new__(cls)
    size = pages * PAGE_SIZE
    pool.layout = layout
    pool.page_size = PAGE_SIZE
    pool.layer_num = LAYERS
    pool.head_num = HEADS
    pool.head_dim = HEAD_DIM
    pool.dtype = DTYPE
    pool.device = "cpu"
    pool.pin_memory = False
    pool.size = size
    pool.page_num = pages
    dims = {  # as MHATokenToKVPoolHost.init_kv_buffer lays them out
        "layer_first": (2, LAYERS, size, HEADS, HEAD_DIM),
        "page_first": (2, size, LAYERS, HEADS, HEAD_DIM),
        "page_first_direct": (2, pages, LAYERS, PAGE_SIZE, HEADS, HEAD_DIM),
    }[layout]
    pool.kv_buffer = torch.randn(dims, generator=torch.Generator().manual_seed(7)).to(DTYPE)
    return pool


def indices_of(pages: list[int]) -> torch.Tensor:
    return torch.tensor([p * PAGE_SIZE + t for p in pages for t in range(PAGE_SIZE)])


def from_threads(backend: Any, keys: list[str], threads: int, rounds: int) -> None:
    """``threads`` threads, as SGLang's prefetch and backup ones, each ``rounds`` times setting
    or checking and getting six of ``keys`` at random; every page got is the key's own."""
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        rng = random.Random(index)
        try:
            for _ in range(rounds):
                batch = rng.sample(keys, 6)
                if rng.random() < 0.5:
                    assert backend.batch_set(batch, [page_for(k) for k in batch])
                else:
                    backend.batch_exists(batch)
                    targets = [torch.zeros(PAGE_NUMEL, dtype=DTYPE) for _ in batch]
                    for key, target, got in zip(
                        batch, targets, backend.batch_get(batch, targets), strict=True
                    ):
                        if got is not None:
                            assert torch.equal(target, page_for(key)), key
        except BaseException as exc:
            errors.append(exc)

    running = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(120)
    assert not any(thread.is_alive() for thread in running)
    assert not errors, errors[:3]
