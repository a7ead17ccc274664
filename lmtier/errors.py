"""The exceptions lmtier raises, one tree rooted at :class:`LmtierError`.

Each leaf also inherits the builtin a caller would reach for, so ``except ValueError``
keeps working for code that does not know lmtier::

    LmtierError
    ├── InvalidKeyError        (ValueError)   key text that cannot round-trip
    ├── InvalidValueError      (ValueError)   a value lmtier cannot store (empty, bad dtype)
    ├── LmtierTypeError        (TypeError)    a key or value of the wrong type
    ├── ConfigError            (ValueError)   a missing, malformed or invalid configuration
    │   ├── DeviceUnavailableError            a configured device that this machine lacks
    │   └── UnsupportedModelError             a model whose KV cache lmtier cannot size yet
    ├── TraceError             (ValueError)   a request trace that cannot be parsed (with its line)
    ├── StorageError           (OSError)      a tier's storage cannot be used (unwritable path, ...)
    │   └── TierUnavailableError              a remote tier's server is down, slow or unreachable
    ├── CorruptEntryError      (ValueError)   stored bytes that fail their header or checksum
    └── StoreClosedError       (RuntimeError) an operation on a closed store
        └── StoreForkedError                  a store used in a child made by fork
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CorruptEntryError",
    "DeviceUnavailableError",
    "InvalidKeyError",
    "InvalidValueError",
    "LmtierError",
    "LmtierTypeError",
    "StorageError",
    "StoreClosedError",
    "StoreForkedError",
    "TierUnavailableError",
    "TraceError",
    "UnsupportedModelError",
]


class LmtierError(Exception):
    """Base of every exception lmtier raises on purpose."""


class InvalidKeyError(LmtierError, ValueError):
    """A key whose text cannot be stored or parsed back (e.g. an '@' inside a field)."""


class InvalidValueError(LmtierError, ValueError):
    """A value of the right type that lmtier cannot store (empty, or of an unsupported dtype)."""


class LmtierTypeError(LmtierError, TypeError):
    """A key or value of the wrong type."""


class ConfigError(LmtierError, ValueError):
    """A configuration that is missing, malformed or names something unknown."""


class DeviceUnavailableError(ConfigError):
    """A tier asks for a device this machine does not have."""


class UnsupportedModelError(ConfigError):
    """A model config whose KV-cache geometry lmtier cannot compute yet (``lmtier plan``)."""


class TraceError(LmtierError, ValueError):
    """A request trace that cannot be read; the message names the file and line."""


class StorageError(LmtierError, OSError):
    """A tier's backing storage cannot be used (an unwritable or vanished folder, a full disk)."""


class TierUnavailableError(StorageError):
    """A remote tier cannot reach its server (down, too slow, restarting); it retries later."""


class CorruptEntryError(LmtierError, ValueError):
    """Stored bytes that fail their header or checksum check; the entry is dropped, never served."""


class StoreClosedError(LmtierError, RuntimeError):
    """An operation was attempted on a store that has been closed."""


class StoreForkedError(StoreClosedError):
    """A store used in a process forked from the one that opened it; the child opens its own."""
