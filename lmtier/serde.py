"""Tensor <-> lmtier's on-disk entry format: a safetensors file whose header carries the key.

Pure functions, no I/O. One entry is one safetensors file holding one tensor named ``kv``;
its ``__metadata__`` carries the format tag and version, the key and a checksum of the payload,
so a file can be verified and re-indexed without trusting anything outside it.  The layout is
``u64 little-endian header length | JSON header (space-padded to 8 bytes) | payload``.
"""

from __future__ import annotations

import ctypes
import json
import struct
from typing import NamedTuple

import torch
import xxhash

from lmtier.errors import CorruptEntryError, InvalidValueError, LmtierTypeError
from lmtier.keys import CacheEngineKey, KeyLike

__all__ = [
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "EntryHeader",
    "check_storable",
    "decode_header",
    "encode_header",
    "header_length",
    "payload_checksum",
    "payload_hasher",
    "payload_view",
]

FORMAT_TAG = "lmtier"
FORMAT_VERSION = 1
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


def check_storable(value: object) -> torch.Tensor:
    """Return ``value`` if lmtier can store it, else raise an error naming the problem."""
    if not isinstance(value, torch.Tensor):
        raise LmtierTypeError(f"a value must be a torch.Tensor, got {type(value).__name__}")
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
    """The bytes of a contiguous CPU tensor, without a copy (of a contiguous copy otherwise)."""
    nbytes = tensor.nbytes
    if nbytes and tensor.is_cpu and tensor.is_contiguous():
        # A ctypes array over the tensor's memory costs a fifth of torch's chain of views (and
        # far less than that with the caches cold, as they are after each multi-MiB write).
        array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
        array.owner = tensor  # type: ignore[attr-defined]  # the memory lives while a view does
        return memoryview(array).cast("B")
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    return flat.numpy().data.cast("B")


def payload_checksum(payload: memoryview | bytes) -> str:
    return xxhash.xxh3_64_hexdigest(payload)


def payload_hasher() -> xxhash.xxh3_64:
    """A streaming form of ``payload_checksum``: ``update`` piece by piece, then ``hexdigest``."""
    return xxhash.xxh3_64()


def encode_header(
    key: KeyLike,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    nbytes: int,
    checksum: str,
    namespace: str = "",
) -> bytes:
    """The length prefix and JSON header that precede a payload of ``nbytes`` bytes."""
    if isinstance(key, CacheEngineKey):
        key_type, key_text = "engine", key.to_string()
    else:
        key_type, key_text = "str", key
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
    """Parse the prefix and header at the start of ``data`` (which may run on into the payload)."""
    length = header_length(data)
    if len(data) < PREFIX_BYTES + length:
        raise CorruptEntryError("file ends inside its header")
    try:
        # raw_decode of text: less than half of json.loads(bytes) on a restart's hot path.
        header, _ = _DECODER.raw_decode(data[PREFIX_BYTES : PREFIX_BYTES + length].decode())
        meta = header["__metadata__"]
        if meta.get("format") != FORMAT_TAG:
            raise CorruptEntryError(f"not an lmtier entry (format {meta.get('format')!r})")
        if meta.get("version") != str(FORMAT_VERSION):
            raise CorruptEntryError(
                f"format version {meta.get('version')!r}, this lmtier reads {FORMAT_VERSION}"
            )
        info = header[TENSOR_NAME]
        key_text = meta["key"]
        key: KeyLike = (
            CacheEngineKey.from_string(key_text) if meta["key_type"] == "engine" else key_text
        )
        dtype = _FROM_SAFETENSORS[info["dtype"]]
        shape = tuple(map(int, info["shape"]))
        start, end = map(int, info["data_offsets"])
        checksum = str(meta["checksum"])
        namespace = str(meta.get("namespace", ""))
    except CorruptEntryError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # UnicodeDecodeError too
        raise CorruptEntryError(f"unreadable header: {exc!r}") from exc
    nbytes = end - start
    numel = 1
    for dim in shape:
        numel *= dim
    if start != 0 or nbytes != numel * dtype.itemsize or nbytes <= 0:
        raise CorruptEntryError(f"header offsets {start}..{end} do not match {dtype}{list(shape)}")
    return EntryHeader(key, dtype, shape, nbytes, checksum, PREFIX_BYTES + length, namespace)
