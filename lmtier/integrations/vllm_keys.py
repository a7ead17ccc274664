"""How vLLM's offloaded blocks are named in lmtier, and the index of the names a tier holds.

Kept apart from the secondary tier (``lmtier.integrations.vllm``) because naming is pure: the
key of one block, the namespace that separates incompatible engines, and the rows a job names
depend on nothing but what vLLM hands in.  The index is the one structure the scheduler reads
and the store's thread writes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
from vllm.v1.kv_offload.base import OffloadKey, get_offload_block_hash, get_offload_group_idx

from lmtier.integrations.model_identity import model_identity

__all__ = ["KeyIndex", "job_slots", "kv_namespace", "offload_key_text"]


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


def job_slots(job: Any) -> np.ndarray:
    """The primary-tier rows of a job: ``block_ids`` in newer vLLM, ``chunk_ids`` before."""
    slots = getattr(job, "block_ids", None)
    if slots is None:
        slots = job.chunk_ids
    return np.asarray(slots, dtype=np.int64).reshape(-1)


class KeyIndex:
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
