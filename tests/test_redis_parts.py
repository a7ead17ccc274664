"""Values sent as a header and a payload, without a copy that joins them."""

from __future__ import annotations

import torch
from redis.asyncio.connection import (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)

from lmtier.serde import payload_view
from lmtier.tiers.redis_parts import ValueParts, parts_connection_class


def test_a_value_in_parts_packs_to_the_bytes_of_the_joined_value() -> None:
    payload = payload_view(torch.arange(5000, dtype=torch.int32))
    header = b"HEADER"
    connection = parts_connection_class(Connection)
    assert connection is not None
    joined = b"".join(connection().pack_command("SET", "name", header + bytes(payload)))
    in_parts = connection().pack_command("SET", "name", ValueParts(header, payload))
    assert b"".join(in_parts) == joined
    # The payload goes out as the tensor's own memory, not a copy.
    assert any(isinstance(p, memoryview) and p.obj is payload.obj for p in in_parts)


def test_a_pipeline_keeps_the_payload_as_it_is() -> None:
    payload = payload_view(torch.ones(1 << 16, dtype=torch.float16))
    connection = parts_connection_class(Connection)
    assert connection is not None
    commands = [("SET", "a", ValueParts(b"h1", payload)), ("GET", "a"), ("SET", "b", b"small")]
    packed = connection().pack_commands(commands)
    expected = b"".join(
        Connection().pack_commands(
            [("SET", "a", b"h1" + bytes(payload)), ("GET", "a"), ("SET", "b", b"small")]
        )
    )
    assert b"".join(packed) == expected
    assert any(isinstance(p, memoryview) and p.obj is payload.obj for p in packed)


def test_other_commands_pack_as_redis_py_packs_them() -> None:
    connection = parts_connection_class(Connection)
    assert connection is not None
    args = ("SET", "key", b"x" * 10000, "EX", 5)
    assert connection().pack_command(*args) == Connection().pack_command(*args)


def test_every_connection_kind_has_a_parts_subclass() -> None:
    for base in (Connection, SSLConnection, UnixDomainSocketConnection):
        parts_class = parts_connection_class(base)
        assert parts_class is not None and issubclass(parts_class, base)
    assert parts_connection_class(type("Other", (Connection,), {})) is None


def test_joined_into_writes_the_concatenation() -> None:
    parts = ValueParts(b"abc", memoryview(b"defgh"))
    out = memoryview(bytearray(16))
    assert bytes(parts.joined_into(out)) == b"abcdefgh"
    assert parts.nbytes == 8
