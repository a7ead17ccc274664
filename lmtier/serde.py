"""Tensor <-> lmtier's on-disk entry format: a safetensors file whose header carries the key.

Pure functions, no I/O. One entry is one safetensors file holding one tensor named ``kv``;
its ``__metadata__`` carries the format tag and version, the namespace, the key and a checksum,
so a file can be verified and re-indexed without trusting anything outside it.  The layout is
``u64 little-endian header length | JSON header (space-padded) | payload``, the payload
starting on ``PAYLOAD_ALIGN`` bytes of the file.

Every header field is checked for its type and range when decoded, before anything is
allocated from it; whether a header is its payload's own is the checksum's part, defined in
``lmtier.checksums`` (unkeyed, or keyed by a tier's secret).  The format's shared names live in
``lmtier.entry_format``.  This module re-exports the public names of both, so ``serde`` remains
the one import for the entry format.
"""

from __future__ import annotations

import ctypes
import json
import re
import struct

import torch

from lmtier.checksums import (
    UNKEYED,
    EntryChecksums,
    PayloadDigest,
    PayloadHasher,
    check_checksum,
    entry_checksum,
    payload_digest,
    payload_hasher,
)
from lmtier.entry_format import (
    CHECKSUM_CHARS,
    FORMAT_TAG,
    FORMAT_VERSION,
    FROM_SAFETENSORS,
    KEYED_CHECKSUM_CHARS,
    TO_SAFETENSORS,
    EntryHeader,
    key_fields,
)
from lmtier.errors import CorruptEntryError, InvalidValueError, LmtierTypeError
from lmtier.keys import CacheEngineKey, KeyLike, check_key

__all__ = [
    "CHECKSUM_CHARS",
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "KEYED_CHECKSUM_CHARS",
    "PAYLOAD_ALIGN",
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

TENSOR_NAME = "kv"
PREFIX_BYTES = 8
# A header holds one tensor entry and a key: anything near this size is not ours.
MAX_HEADER_BYTES = 1 << 20
# Where a payload starts in its file (a multiple of safetensors' 8 bytes): the kernel copies a
# cached file into memory ~1.4x faster from a 32-byte aligned offset than from an 8-byte one
# (2 MiB reads here: 16 ms against 11 ms per 128 MiB).  Readers accept any padding.
PAYLOAD_ALIGN = 64

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
    if value.dtype not in TO_SAFETENSORS:
        raise InvalidValueError(
            f"dtype {value.dtype} cannot be stored; supported: "
            + ", ".join(str(d).removeprefix("torch.") for d in TO_SAFETENSORS)
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


def encode_header(
    key: KeyLike,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    nbytes: int,
    checksum: str,
    namespace: str = "",
) -> bytes:
    """The length prefix and JSON header that precede a payload of ``nbytes`` bytes."""
    key_type, key_text = key_fields(key)
    text = (
        _HEADER_JSON
        % (
            json.dumps(namespace),
            key_type,
            json.dumps(key_text),
            json.dumps(checksum),
            TO_SAFETENSORS[dtype],
            ",".join(map(str, shape)),
            nbytes,
        )
    ).encode()
    text += b" " * (-(PREFIX_BYTES + len(text)) % PAYLOAD_ALIGN)
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
    dtype = FROM_SAFETENSORS.get(dtype_name) if type(dtype_name) is str else None
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
