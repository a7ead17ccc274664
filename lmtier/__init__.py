"""lmtier: an asyncio tiered KV-cache store (GPU -> pinned CPU -> disk)."""

from lmtier.config import StoreConfig, TierConfig, apply_log_level
from lmtier.errors import (
    ConfigError,
    CorruptEntryError,
    DeviceUnavailableError,
    InvalidKeyError,
    InvalidValueError,
    LmtierError,
    LmtierTypeError,
    StorageError,
    StoreClosedError,
    StoreForkedError,
    TierUnavailableError,
)
from lmtier.evictor import BaseEvictor, DummyEvictor, LRUEvictor, PutStatus
from lmtier.keys import CacheEngineKey, KeyLike
from lmtier.metadata import DiskCacheMetadata
from lmtier.store import TieredStore

__version__ = "0.1.0"

apply_log_level()

__all__ = [
    "BaseEvictor",
    "CacheEngineKey",
    "ConfigError",
    "CorruptEntryError",
    "DeviceUnavailableError",
    "DiskCacheMetadata",
    "DummyEvictor",
    "InvalidKeyError",
    "InvalidValueError",
    "KeyLike",
    "LRUEvictor",
    "LmtierError",
    "LmtierTypeError",
    "PutStatus",
    "StorageError",
    "StoreClosedError",
    "StoreConfig",
    "StoreForkedError",
    "TierConfig",
    "TierUnavailableError",
    "TieredStore",
    "__version__",
]
