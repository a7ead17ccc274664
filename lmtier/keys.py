"""Cache keys: LMCache's ``CacheEngineKey``, and the plain ``str`` keys its API also takes."""

from __future__ import annotations

from dataclasses import dataclass

from lmtier.errors import InvalidKeyError, LmtierTypeError

__all__ = ["MAX_KEY_BYTES", "CacheEngineKey", "KeyLike", "check_key", "key_to_text"]

_SEP = "@"
# The longest key, in bytes of UTF-8 text: a key travels in each entry's header, and a header
# must stay far below ``serde.MAX_HEADER_BYTES`` even with every byte escaped in JSON (6x).
MAX_KEY_BYTES = 64 * 1024


@dataclass(frozen=True)
class CacheEngineKey:
    """Names one KV-cache chunk: which model, which worker of how many, which token chunk.

    ``to_string()`` gives LMCache's ``"fmt@model_name@world_size@worker_id@chunk_hash"`` and
    ``from_string()`` is its exact inverse, so a field may not contain ``'@'``.
    """

    fmt: str
    model_name: str
    world_size: int
    worker_id: int
    chunk_hash: str

    def __post_init__(self) -> None:
        for name in ("fmt", "model_name", "chunk_hash"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise LmtierTypeError(
                    f"CacheEngineKey.{name} must be str, got {type(value).__name__}"
                )
            if not value:
                raise InvalidKeyError(f"CacheEngineKey.{name} must not be empty")
            if _SEP in value:
                raise InvalidKeyError(
                    f"CacheEngineKey.{name}={value!r} contains {_SEP!r}, "
                    "which would break to_string()/from_string()"
                )
        for name in ("world_size", "worker_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise LmtierTypeError(
                    f"CacheEngineKey.{name} must be int, got {type(value).__name__}"
                )
        if self.world_size < 1:
            raise InvalidKeyError(f"CacheEngineKey.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.worker_id < self.world_size:
            raise InvalidKeyError(
                f"CacheEngineKey.worker_id must be in [0, {self.world_size}), got {self.worker_id}"
            )

    def to_string(self) -> str:
        return _SEP.join(
            (self.fmt, self.model_name, str(self.world_size), str(self.worker_id), self.chunk_hash)
        )

    @staticmethod
    def from_string(text: str) -> CacheEngineKey:
        if not isinstance(text, str):
            raise LmtierTypeError(f"CacheEngineKey text must be str, got {type(text).__name__}")
        parts = text.split(_SEP)
        if len(parts) != 5:
            raise InvalidKeyError(
                f"{text!r} is not 'fmt@model_name@world_size@worker_id@chunk_hash' "
                f"({len(parts)} fields instead of 5)"
            )
        fmt, model_name, world_size, worker_id, chunk_hash = parts
        try:
            return CacheEngineKey(fmt, model_name, int(world_size), int(worker_id), chunk_hash)
        except ValueError as exc:
            if isinstance(exc, InvalidKeyError):
                raise
            raise InvalidKeyError(f"{text!r}: world_size and worker_id must be integers") from exc


KeyLike = CacheEngineKey | str


def check_key(key: object) -> KeyLike:
    """Return ``key`` if it is a usable key, else raise a clear error naming the problem.

    A key's text (``key_to_text``) may be at most ``MAX_KEY_BYTES`` bytes of UTF-8.
    """
    if isinstance(key, CacheEngineKey):
        # Counted in characters first: a UTF-8 character is at most 4 bytes, a number's text
        # and the separators far less than the margin.
        if len(key.fmt) + len(key.model_name) + len(key.chunk_hash) > MAX_KEY_BYTES // 4 - 64:
            _check_length(key.to_string())
        return key
    if isinstance(key, str):
        if not key:
            raise InvalidKeyError("a str key must not be empty")
        if len(key) > MAX_KEY_BYTES // 4:
            _check_length(key)
        return key
    raise LmtierTypeError(f"a key must be CacheEngineKey or str, got {type(key).__name__}")


def _check_length(text: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise InvalidKeyError(
            f"a key of {size} bytes of UTF-8 text is longer than the {MAX_KEY_BYTES} allowed"
        )


def key_to_text(key: KeyLike) -> str:
    """The key's canonical text: ``to_string()`` for a CacheEngineKey, the str itself otherwise."""
    return key.to_string() if isinstance(key, CacheEngineKey) else key
