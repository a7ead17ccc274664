"""Tensor <-> lmtier's on-disk entry format: a safetensors file whose header carries the key.

Pure functions, no I/O. One entry is one safetensors file holding one tensor named ``kv``;
its ``__metadata__`` carries the format tag and version, the namespace, the key and a checksum,
so a file can be verified and re-indexed without trusting anything outside it.  The layout is
``u64 little-endian header length | JSON header (space-padded to 8 bytes) | payload``.

The checksum covers the header's fields as well as the payload: a header rewritten to another
shape, dtype, key or namespace (a payload of the same size read as something else) fails it
like a flipped payload byte.  It is xxh3-64 of the canonical text of the fields (format
version, namespace, key type and text, dtype, shape, size), seeded with xxh3-64 of the payload:
one pass over the payload, then a hash of a short string.  Every header field is also checked
for its type and range when decoded, before anything is allocated from it.

That checksum is unkeyed: it finds damage, not an adversary, since anyone can compute it.  A
tier given a secret (``auth_key``) makes and checks keyed checksums instead (``EntryChecksums``):
32 hex digits in place of 16, the same construction with keyed BLAKE3 in place of xxh3, so
that only a holder of the secret can write an entry that verifies.  Today's unkeyed format is
unchanged; the length of the checksum tells the kinds apart, and an entry of the other kind
than the reader's fails its check (older readers refuse a 32-digit checksum outright).
"""

from __future__ import annotations

import ctypes
import hmac
import json
import re
import struct
from typing import Any, NamedTuple, Protocol

import torch
import xxhash

from lmtier.errors import ConfigError, CorruptEntryError, InvalidValueError, LmtierTypeError
from lmtier.keys import CacheEngineKey, KeyLike, check_key

__all__ = [
    "CHECKSUM_CHARS",
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "KEYED_CHECKSUM_CHARS",
    "UNKEYED",
    "EntryChecksums",
    "EntryHeader",
    "PayloadDigest",
    "PayloadHasher",
    "check_checksum",
    "check_storable",
    "decode_header",
    "encode_header",
    "entry_checksum",
    "header_length",
    "payload_digest",
    "payload_hasher",
    "payload_view",
]

FORMAT_TAG = "lmtier"
# 2: the checksum covers the header's fields, and key digests tell the kinds of keys apart.
FORMAT_VERSION = 2
CHECKSUM_CHARS = 16  # xxh3-64 in lower-case hex
KEYED_CHECKSUM_CHARS = 32  # 128 bits of keyed BLAKE3 in lower-case hex
TENSOR_NAME = "kv"
PREFIX_BYTES = 8
# A header holds one tensor entry and a key: anything near this size is not ours.
MAX_HEADER_BYTES = 1 << 20

_TO_SAFETENSORS: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_FROM_SAFETENSORS = {name: dtype for dtype, name in _TO_SAFETENSORS.items()}
# The header as ``json.dumps`` would write it (compact separators), filled in by ``%``: less than
# half of dumping a nested dict, on every write.  Strings go through ``json.dumps`` for escaping.
_HEADER_JSON = (
    f'{{"__metadata__":{{"format":"{FORMAT_TAG}","version":"{FORMAT_VERSION}",'
    '"namespace":%s,"key_type":"%s","key":%s,"checksum":%s},'
    f'"{TENSOR_NAME}":{{"dtype":"%s","shape":[%s],"data_offsets":[0,%d]}}}}'
)
_DECODER = json.JSONDecoder()
_META_FIELDS = 6  # format, version, namespace, key_type, key, checksum
_CHECKSUM = re.compile(f"[0-9a-f]{{{CHECKSUM_CHARS}}}|[0-9a-f]{{{KEYED_CHECKSUM_CHARS}}}")
# BLAKE3 key derivation contexts (globally unique, fixed forever): one key per use of a secret.
_PAYLOAD_CONTEXT = "lmtier 2025 keyed entries: payload digest"
_ENTRY_CONTEXT = "lmtier 2025 keyed entries: entry checksum"
_NAMES_CONTEXT = "lmtier 2025 keyed entries: redis key names"
NAME_TAG_CHARS = 16

PayloadDigest = int | bytes  # xxh3-64 (unkeyed) or keyed BLAKE3 (keyed) of a payload


class EntryHeader(NamedTuple):
    """What an entry's header says: whose payload it is, how to decode it, how to check it."""

    key: KeyLike
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    checksum: str
    payload_offset: int
    namespace: str = ""

    @property
    def file_size(self) -> int:
        """The size of a complete file with this header."""
        return self.payload_offset + self.nbytes

    @property
    def keyed(self) -> bool:
        """Whether the checksum is keyed (written by a tier with a secret)."""
        return len(self.checksum) == KEYED_CHECKSUM_CHARS


def check_storable(value: object) -> torch.Tensor:
    """Return ``value`` if lmtier can store it, else raise an error naming the problem."""
    if not isinstance(value, torch.Tensor):
        raise LmtierTypeError(f"a value must be a torch.Tensor, got {type(value).__name__}")
    if value.is_nested:
        raise InvalidValueError("a nested tensor cannot be stored; store its components")
    if value.layout is not torch.strided:
        raise InvalidValueError(f"only dense tensors can be stored, got layout {value.layout}")
    if value.is_meta:
        raise InvalidValueError("a meta tensor has no data to store")
    if value.numel() == 0:
        raise InvalidValueError(f"an empty tensor (shape {tuple(value.shape)}) cannot be stored")
    if value.dtype not in _TO_SAFETENSORS:
        raise InvalidValueError(
            f"dtype {value.dtype} cannot be stored; supported: "
            + ", ".join(str(d).removeprefix("torch.") for d in _TO_SAFETENSORS)
        )
    return value


def payload_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (of a contiguous copy otherwise).

    A negative or conjugate view's memory holds the values before negation: its view is of a
    resolved copy, so writing into it does not reach ``tensor``.
    """
    if tensor.is_neg() or tensor.is_conj():
        tensor = tensor.resolve_conj().resolve_neg()
    nbytes = tensor.nbytes
    if nbytes and tensor.is_cpu and tensor.is_contiguous():
        # A ctypes array over the tensor's memory costs a fifth of torch's chain of views (and
        # far less than that with the caches cold, as they are after each multi-MiB write).
        array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
        array.owner = tensor  # type: ignore[attr-defined]  # the memory lives while a view does
        return memoryview(array).cast("B")
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    return flat.numpy().data.cast("B")


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
    key_type, key_text = _key_fields(key)
    # Strings carry their lengths, so no choice of texts makes two field lists read alike.
    fields = (
        f"{FORMAT_TAG}/{FORMAT_VERSION}|{len(namespace)}:{namespace}|{key_type}|"
        f"{len(key_text)}:{key_text}|{_TO_SAFETENSORS[dtype]}|{','.join(map(str, shape))}|{nbytes}"
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


def _key_fields(key: KeyLike) -> tuple[str, str]:
    if isinstance(key, CacheEngineKey):
        return "engine", key.to_string()
    return "str", key


def encode_header(
    key: KeyLike,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    nbytes: int,
    checksum: str,
    namespace: str = "",
) -> bytes:
    """The length prefix and JSON header that precede a payload of ``nbytes`` bytes."""
    key_type, key_text = _key_fields(key)
    text = (
        _HEADER_JSON
        % (
            json.dumps(namespace),
            key_type,
            json.dumps(key_text),
            json.dumps(checksum),
            _TO_SAFETENSORS[dtype],
            ",".join(map(str, shape)),
            nbytes,
        )
    ).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the payload to 8 bytes
    return struct.pack("<Q", len(text)) + text


def header_length(prefix: bytes) -> int:
    """The JSON header's length from the first 8 bytes of a file."""
    if len(prefix) < PREFIX_BYTES:
        raise CorruptEntryError(f"file is {len(prefix)} bytes, shorter than a header prefix")
    (length,) = struct.unpack_from("<Q", prefix)
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise CorruptEntryError(f"header length {length} is not plausible")
    return int(length)


def decode_header(data: bytes) -> EntryHeader:
    """Parse the prefix and header at the start of ``data`` (which may run on into the payload).

    Every field is checked (types, ranges, consistency), so a header that decodes describes a
    tensor that can be allocated; whether it is the payload's own is ``check_checksum``'s part.
    """
    length = header_length(data)
    if len(data) < PREFIX_BYTES + length:
        raise CorruptEntryError("file ends inside its header")
    try:
        # raw_decode of text: less than half of json.loads(bytes) on a restart's hot path.
        text = data[PREFIX_BYTES : PREFIX_BYTES + length].decode()
        header, end = _DECODER.raw_decode(text)
        return _header_from(header, text[end:], length)
    except CorruptEntryError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # UnicodeDecodeError too
        raise CorruptEntryError(f"unreadable header: {exc!r}") from exc


def _header_from(header: object, rest: str, length: int) -> EntryHeader:
    # Fields are looked up by name (KeyError: corrupt) and counted, so none is extra.
    if rest.strip(" "):
        raise CorruptEntryError("the header has more than padding after its JSON")
    if type(header) is not dict or len(header) != 2:
        raise CorruptEntryError("not an lmtier entry (its header is not one tensor's)")
    meta, info = header["__metadata__"], header[TENSOR_NAME]
    if type(meta) is not dict or meta.get("format") != FORMAT_TAG:
        raise CorruptEntryError(f"not an lmtier entry (format {_get(meta, 'format')!r})")
    if meta.get("version") != str(FORMAT_VERSION):
        raise CorruptEntryError(
            f"another format version ({meta.get('version')!r}), this lmtier reads {FORMAT_VERSION}"
        )
    if len(meta) != _META_FIELDS or type(info) is not dict or len(info) != 3:
        raise CorruptEntryError("the header's fields are not those of an lmtier entry")
    namespace, checksum = meta["namespace"], meta["checksum"]
    if type(namespace) is not str:
        raise CorruptEntryError(f"namespace {namespace!r} is not a string")
    if type(checksum) is not str or _CHECKSUM.fullmatch(checksum) is None:
        raise CorruptEntryError(
            f"checksum {checksum!r} is not {CHECKSUM_CHARS} or {KEYED_CHECKSUM_CHARS} hex digits"
        )
    key = _key_from(meta["key_type"], meta["key"])
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    dtype = _FROM_SAFETENSORS.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise CorruptEntryError(f"dtype {dtype_name!r} is not one lmtier stores")
    if type(shape) is not list:
        raise CorruptEntryError(f"shape {shape!r} is not a list")
    numel = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:  # bool is no int here, nor 2.0
            raise CorruptEntryError(f"shape {shape!r} is not of non-negative integers")
        numel *= dim
    if type(offsets) is not list or len(offsets) != 2:
        raise CorruptEntryError(f"data_offsets {offsets!r} are not two integers")
    start, end = offsets
    if type(start) is not int or type(end) is not int:
        raise CorruptEntryError(f"data_offsets {offsets!r} are not two integers")
    nbytes = end - start
    if start != 0 or nbytes != numel * dtype.itemsize or nbytes <= 0:
        raise CorruptEntryError(f"header offsets {start}..{end} do not match {dtype}{shape}")
    return EntryHeader(key, dtype, tuple(shape), nbytes, checksum, PREFIX_BYTES + length, namespace)


def _key_from(key_type: object, text: object) -> KeyLike:
    if type(text) is not str:
        raise CorruptEntryError(f"key {text!r} is not a string")
    if key_type == "str":
        return check_key(text)
    if key_type == "engine":
        key = CacheEngineKey.from_string(text)
        if key.to_string() != text:  # e.g. "01" for a worker id: not text lmtier writes
            raise CorruptEntryError(f"engine key {text!r} is not in its canonical form")
        return key
    raise CorruptEntryError(f"key type {key_type!r} is neither 'str' nor 'engine'")


def _get(mapping: object, name: str) -> object:
    return mapping.get(name) if isinstance(mapping, dict) else None
