"""The vocabulary of lmtier's entry format, shared by its codec (serde) and its checksums.

The format's tag and version, the lengths of the two kinds of checksum, the dtypes an entry may
hold with their safetensors names, what a decoded header says (``EntryHeader``) and how a key is
written as a kind and a text.  Both the header codec and the checksum, which covers the header's
fields, speak of these, so they live below both.  Pure definitions, no I/O.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmtier.keys import CacheEngineKey, KeyLike

__all__ = [
    "CHECKSUM_CHARS",
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "FROM_SAFETENSORS",
    "KEYED_CHECKSUM_CHARS",
    "TO_SAFETENSORS",
    "EntryHeader",
    "key_fields",
]

FORMAT_TAG = "lmtier"
# 2: the checksum covers the header's fields, and key digests tell the kinds of keys apart.
FORMAT_VERSION = 2
CHECKSUM_CHARS = 16  # xxh3-64 in lower-case hex
KEYED_CHECKSUM_CHARS = 32  # 128 bits of keyed BLAKE3 in lower-case hex

TO_SAFETENSORS: dict[torch.dtype, str] = {
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
FROM_SAFETENSORS = {name: dtype for dtype, name in TO_SAFETENSORS.items()}


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


def key_fields(key: KeyLike) -> tuple[str, str]:
    """A key as the header writes it: its kind (``str`` or ``engine``) and its text."""
    if isinstance(key, CacheEngineKey):
        return "engine", key.to_string()
    return "str", key
