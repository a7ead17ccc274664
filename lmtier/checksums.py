"""Entry checksums: how a tier proves an entry intact, and, given a secret, its own.

The checksum covers the header's fields as well as the payload: a header rewritten to another
shape, dtype, key or namespace (a payload of the same size read as something else) fails it
like a flipped payload byte.  It is xxh3-64 of the canonical text of the fields (format
version, namespace, key type and text, dtype, shape, size), seeded with xxh3-64 of the payload:
one pass over the payload, then a hash of a short string.

That checksum is unkeyed: it finds damage, not an adversary, since anyone can compute it.  A
tier given a secret (``auth_key``) makes and checks keyed checksums instead (``EntryChecksums``):
32 hex digits in place of 16, the same construction with keyed BLAKE3 in place of xxh3, so
that only a holder of the secret can write an entry that verifies.  The length of the checksum
tells the kinds apart, and an entry of the other kind than the reader's fails its check.

Kept apart from the header codec (serde) because it holds the secret-derived keys and the
hashing: the codec only carries a checksum's text.  Pure functions, no I/O; ``serde``
re-exports every public name here.
"""

from __future__ import annotations

import hmac
from typing import Any, Protocol

import torch
import xxhash

from lmtier.entry_format import (
    FORMAT_TAG,
    FORMAT_VERSION,
    KEYED_CHECKSUM_CHARS,
    TO_SAFETENSORS,
    EntryHeader,
    key_fields,
)
from lmtier.errors import ConfigError, CorruptEntryError, LmtierTypeError
from lmtier.keys import KeyLike

__all__ = [
    "NAME_TAG_CHARS",
    "UNKEYED",
    "EntryChecksums",
    "PayloadDigest",
    "PayloadHasher",
    "check_checksum",
    "entry_checksum",
    "payload_digest",
    "payload_hasher",
]

# BLAKE3 key derivation contexts (globally unique, fixed forever): one key per use of a secret.
_PAYLOAD_CONTEXT = "lmtier 2025 keyed entries: payload digest"
_ENTRY_CONTEXT = "lmtier 2025 keyed entries: entry checksum"
_NAMES_CONTEXT = "lmtier 2025 keyed entries: redis key names"
NAME_TAG_CHARS = 16

PayloadDigest = int | bytes  # xxh3-64 (unkeyed) or keyed BLAKE3 (keyed) of a payload


def payload_digest(payload: memoryview | bytes) -> int:
    """The payload's hash, which ``entry_checksum`` folds into an entry's checksum."""
    return xxhash.xxh3_64_intdigest(payload)


def payload_hasher() -> xxhash.xxh3_64:
    """A streaming form of ``payload_digest``: ``update`` piece by piece, then ``intdigest``."""
    return xxhash.xxh3_64()


def entry_checksum(
    key: KeyLike,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    nbytes: int,
    payload_digest: int,
    namespace: str = "",
) -> str:
    """The checksum of an entry: its header's fields, seeded with ``payload_digest(payload)``."""
    fields = _fields_text(key, dtype, shape, nbytes, namespace)
    return xxhash.xxh3_64_hexdigest(fields, seed=payload_digest)


def check_checksum(header: EntryHeader, payload_digest: int, where: str) -> None:
    """Raise ``CorruptEntryError`` unless ``header``'s checksum is that of its fields and of the
    payload whose digest is given (unkeyed: a keyed entry fails)."""
    UNKEYED.check(header, payload_digest, where)


def _fields_text(
    key: KeyLike, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int, namespace: str
) -> bytes:
    """The header's fields that a checksum covers, as one canonical text."""
    key_type, key_text = key_fields(key)
    # Strings carry their lengths, so no choice of texts makes two field lists read alike.
    fields = (
        f"{FORMAT_TAG}/{FORMAT_VERSION}|{len(namespace)}:{namespace}|{key_type}|"
        f"{len(key_text)}:{key_text}|{TO_SAFETENSORS[dtype]}|{','.join(map(str, shape))}|{nbytes}"
    )
    return fields.encode("utf-8", "surrogatepass")


class PayloadHasher(Protocol):
    """A payload digest computed piece by piece: ``update`` each piece, then ``finish``."""

    def update(self, data: memoryview | bytes, /) -> None: ...

    def finish(self) -> PayloadDigest: ...


class _Xxh3Hasher:
    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = xxhash.xxh3_64()

    def update(self, data: memoryview | bytes, /) -> None:
        self._state.update(data)

    def finish(self) -> int:
        return self._state.intdigest()


class _KeyedHasher:
    __slots__ = ("_state",)

    def __init__(self, state: Any) -> None:
        self._state = state

    def update(self, data: memoryview | bytes, /) -> None:
        self._state.update(data)

    def finish(self) -> bytes:
        return bytes(self._state.digest())


class EntryChecksums:
    """How a tier makes and checks its entries' checksums: unkeyed, or keyed by a secret.

    Unkeyed (``EntryChecksums()``, also ``UNKEYED``): xxh3-64 as the module docstring says,
    16 hex digits.  Keyed (``EntryChecksums(auth_key)``), an HMAC-class construction in one
    pass over the payload::

        digest   = BLAKE3(key=k_payload, payload)                      32 bytes
        checksum = BLAKE3(key=k_entry, header fields || digest)[:16]   32 hex digits

    where ``k_payload`` and ``k_entry`` are derived from the secret (BLAKE3's key derivation,
    one context each), and the header fields are those the unkeyed checksum covers (format
    version, namespace, key type and text, dtype, shape, size).  Without the secret no one can
    compute a checksum that verifies, nor learn the secret from checksums.

    An entry whose kind (keyed or not) differs from the checker's fails its check, so a tier
    with a secret never serves an entry written without one, and the other way round.  The
    secret itself is not kept, only keys derived from it; no repr or error text shows them.
    Keyed checksums need the ``blake3`` package (``pip install 'lmtier[auth]'``).
    """

    __slots__ = ("_blake3", "_entry_key", "_names_key", "_payload_key")

    def __init__(self, auth_key: bytes | None = None) -> None:
        self._payload_key = self._entry_key = self._names_key = b""
        self._blake3: Any = None
        if auth_key is None:
            return
        if not isinstance(auth_key, bytes | bytearray):
            raise LmtierTypeError(f"auth_key must be bytes, got {type(auth_key).__name__}")
        if not auth_key:
            raise ConfigError("auth_key is empty: give a secret of at least 32 random bytes")
        try:
            from blake3 import blake3
        except ImportError as exc:
            raise ConfigError(
                "a secret (auth_key) needs the blake3 package: pip install 'lmtier[auth]'"
            ) from exc
        secret = bytes(auth_key)
        self._payload_key = blake3(secret, derive_key_context=_PAYLOAD_CONTEXT).digest()
        self._entry_key = blake3(secret, derive_key_context=_ENTRY_CONTEXT).digest()
        self._names_key = blake3(secret, derive_key_context=_NAMES_CONTEXT).digest()
        self._blake3 = blake3

    @property
    def keyed(self) -> bool:
        """Whether checksums are keyed by a secret."""
        return self._blake3 is not None

    def __repr__(self) -> str:
        return f"EntryChecksums(keyed={self.keyed})"

    def __reduce__(self) -> Any:
        raise TypeError("EntryChecksums holds keys derived from a secret: it is not pickled")

    def payload_digest(self, payload: memoryview | bytes) -> PayloadDigest:
        """The payload's digest, which ``entry_checksum`` folds into an entry's checksum."""
        if self._blake3 is None:
            return xxhash.xxh3_64_intdigest(payload)
        return bytes(self._blake3(payload, key=self._payload_key).digest())

    def payload_hasher(self) -> PayloadHasher:
        """A streaming form of ``payload_digest``."""
        if self._blake3 is None:
            return _Xxh3Hasher()
        return _KeyedHasher(self._blake3(key=self._payload_key))

    def entry_checksum(
        self,
        key: KeyLike,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        nbytes: int,
        payload_digest: PayloadDigest,
        namespace: str = "",
    ) -> str:
        """The checksum of an entry: its header's fields and its payload's digest."""
        fields = _fields_text(key, dtype, shape, nbytes, namespace)
        if self._blake3 is None:
            assert isinstance(payload_digest, int), "an unkeyed digest is an int"
            return xxhash.xxh3_64_hexdigest(fields, seed=payload_digest)
        assert isinstance(payload_digest, bytes), "a keyed digest is bytes"
        mac = self._blake3(fields + payload_digest, key=self._entry_key)
        return str(mac.hexdigest(length=KEYED_CHECKSUM_CHARS // 2))

    def check_kind(self, header: EntryHeader, where: str) -> None:
        """Raise ``CorruptEntryError`` if the entry's checksum is not of this checker's kind.

        A header-only test that spares reading a payload that cannot verify; only ``check``
        proves an entry intact (and, keyed, written by a holder of the secret).
        """
        if header.keyed and not self.keyed:
            raise CorruptEntryError(
                f"{where}: written with a secret (its checksum is keyed), and this tier has none"
            )
        if self.keyed and not header.keyed:
            raise CorruptEntryError(
                f"{where}: written without the tier's secret (its checksum is not keyed)"
            )

    def check(self, header: EntryHeader, payload_digest: PayloadDigest, where: str) -> None:
        """Raise ``CorruptEntryError`` unless ``header``'s checksum is that of its fields and of
        the payload whose digest is given, and of this checker's kind."""
        self.check_kind(header, where)
        expected = self.entry_checksum(
            header.key, header.dtype, header.shape, header.nbytes, payload_digest, header.namespace
        )
        if not hmac.compare_digest(expected, header.checksum):
            what = "altered, or written with another secret" if self.keyed else "altered"
            raise CorruptEntryError(f"{where}: checksum mismatch (payload or header {what})")

    def name_tag(self, text: str) -> str | None:
        """A short keyed hash of ``text`` (None when unkeyed): names made with it differ
        between secrets, so that tiers with different secrets never touch each other's."""
        if self._blake3 is None:
            return None
        mac = self._blake3(text.encode("utf-8", "surrogatepass"), key=self._names_key)
        return str(mac.hexdigest(length=NAME_TAG_CHARS // 2))


UNKEYED = EntryChecksums()
