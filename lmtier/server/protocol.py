"""The server's wire format: length-prefixed msgpack frames of typed messages (msgspec).

A frame is a 4-byte little-endian body length followed by the body, one message encoded as a
msgpack array whose first element names its type.  Every request carries an ``id`` chosen by
the client; the reply to it carries the same ``id`` (0 when the request could not be decoded).
Payload bytes never travel in a frame: ``Load`` and ``Store`` name a shared-memory region the
client mapped with ``MapRegion`` (its file descriptor passed beside that frame with
SCM_RIGHTS) and the offsets of the blocks in it.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from lmtier.keys import CacheEngineKey, KeyLike

__all__ = [
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "Contained",
    "Contains",
    "Delete",
    "Deleted",
    "Doorbell",
    "EngineKey",
    "Error",
    "Found",
    "FrameError",
    "FrameReader",
    "Held",
    "Holds",
    "Load",
    "Loaded",
    "MapRegion",
    "Mapped",
    "Ping",
    "Pong",
    "Reply",
    "Request",
    "Stats",
    "StatsReply",
    "Store",
    "Stored",
    "UnmapRegion",
    "decode_reply",
    "decode_request",
    "encode_frame",
    "key_from_wire",
    "key_to_wire",
]

PROTOCOL_VERSION = 1
# A request names at most a few thousand keys; anything larger is a broken or hostile peer.
MAX_FRAME_BYTES = 16 * 1024 * 1024
_HEADER = struct.Struct("<I")


class EngineKey(msgspec.Struct, array_like=True, frozen=True):
    """A ``CacheEngineKey`` on the wire (a plain ``str`` key travels as a string)."""

    fmt: str
    model_name: str
    world_size: int
    worker_id: int
    chunk_hash: str


WireKey = str | EngineKey


class _Message(msgspec.Struct, array_like=True, tag=True):
    id: int


# ---------------------------------------------------------------- requests
class Ping(_Message):
    pass


class MapRegion(_Message):
    """Map the region whose descriptor came with this frame, as number ``region``.

    ``unsealed``: the descriptor is a shared file of the client's own that cannot be sealed
    (an engine's shared-memory file), not a sealed memfd; see ``lmtier.server.regions``."""

    region: int
    size: int
    unsealed: bool = False


class UnmapRegion(_Message):
    region: int


class Doorbell(_Message):
    """Use mapped ``region`` as this connection's completion ring (``lmtier.server.ring``):
    the server records there each reply it has sent.  Answered with ``Mapped``."""

    region: int


class Load(_Message):
    """Copy each key's entry into ``region`` at ``offsets[i]`` (at most ``sizes[i]`` bytes)."""

    keys: list[WireKey]
    region: int
    offsets: list[int]
    sizes: list[int]


class Store(_Message):
    """Put the block at ``offsets[i]`` of ``region`` (``sizes[i]`` bytes, read as a tensor of
    ``dtypes[i]`` and ``shapes[i]``) under ``keys[i]``."""

    keys: list[WireKey]
    region: int
    offsets: list[int]
    sizes: list[int]
    dtypes: list[str]
    shapes: list[list[int]]


class Delete(_Message):
    key: WireKey


class Contains(_Message):
    key: WireKey


class Holds(_Message):
    """Which of ``keys`` the store holds (a batched ``Contains``); answered with ``Held``."""

    keys: list[WireKey]


class Stats(_Message):
    pass


Request = (
    Ping | MapRegion | UnmapRegion | Doorbell | Load | Store | Delete | Contains | Holds | Stats
)


# ---------------------------------------------------------------- replies
class Found(msgspec.Struct, array_like=True, frozen=True):
    """A hit of a ``Load``: its tensor's dtype and shape; ``copied`` is False when the entry
    (``nbytes``) did not fit in the room the request gave it, and nothing was written."""

    dtype: str
    shape: list[int]
    nbytes: int
    copied: bool


class Pong(_Message):
    version: int
    pid: int


class Mapped(_Message):
    region: int


class Loaded(_Message):
    found: list[Found | None]


class Stored(_Message):
    placed: list[bool]


class Deleted(_Message):
    existed: bool


class Contained(_Message):
    tier: str | None


class Held(_Message):
    """Per key of a ``Holds``: the tier holding it, or None."""

    tiers: list[str | None]


class StatsReply(_Message):
    stats: dict[str, Any]


class Error(_Message):
    """A request that failed: ``kind`` is the error class's name, ``message`` says why."""

    kind: str
    message: str


Reply = Pong | Mapped | Loaded | Stored | Deleted | Contained | Held | StatsReply | Error

_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


class FrameError(Exception):
    """A frame whose length is out of bounds: the stream cannot be trusted past it."""


def encode_frame(message: msgspec.Struct) -> bytes:
    body = _encoder.encode(message)
    return _HEADER.pack(len(body)) + body


def decode_request(body: bytes | memoryview) -> Request:
    """Raises ``msgspec.DecodeError`` (or its ``ValidationError``) for a malformed body."""
    return _request_decoder.decode(body)


def decode_reply(body: bytes | memoryview) -> Reply:
    return _reply_decoder.decode(body)


class FrameReader:
    """Splits a byte stream into frame bodies; remembers a partial frame between feeds."""

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """The bodies that ``data`` completes; FrameError for a length out of bounds."""
        self._buffer += data
        bodies: list[bytes] = []
        start = 0
        while len(self._buffer) - start >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer, start)
            if length > self._max:
                raise FrameError(f"a frame of {length} bytes (the most is {self._max})")
            end = start + _HEADER.size + length
            if end > len(self._buffer):
                break
            bodies.append(bytes(self._buffer[start + _HEADER.size : end]))
            start = end
        del self._buffer[:start]
        return bodies

    @property
    def pending(self) -> int:
        """Bytes of a frame begun and not finished."""
        return len(self._buffer)

    def describe_pending(self) -> str:
        if len(self._buffer) < _HEADER.size:
            return f"{len(self._buffer)} byte(s) of a frame header"
        (length,) = _HEADER.unpack_from(self._buffer)
        return f"{len(self._buffer) - _HEADER.size} of a frame's {length} bytes"


def key_to_wire(key: KeyLike) -> WireKey:
    if isinstance(key, CacheEngineKey):
        return EngineKey(key.fmt, key.model_name, key.world_size, key.worker_id, key.chunk_hash)
    return key


def key_from_wire(key: WireKey) -> KeyLike:
    """The store's key (``CacheEngineKey`` checks its fields and raises a clear error)."""
    if isinstance(key, EngineKey):
        return CacheEngineKey(
            key.fmt, key.model_name, key.world_size, key.worker_id, key.chunk_hash
        )
    return key
