"""Engine-facing API: chunked prefix keys, lookup/store/retrieve, and a paged-KV adapter."""

from lmtier.engine.chunks import ChunkKey, ChunkSpec, fingerprint_tensors, token_chunks
from lmtier.engine.kv import KVCacheEngine, PrefixLookup
from lmtier.engine.paged import PagedKVAdapter

__all__ = [
    "ChunkKey",
    "ChunkSpec",
    "KVCacheEngine",
    "PagedKVAdapter",
    "PrefixLookup",
    "fingerprint_tensors",
    "token_chunks",
]
