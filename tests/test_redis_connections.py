"""Values sent as a header and a payload, without a copy that joins them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import ResponseError

from lmtier.serde import payload_view
from lmtier.tiers.redis_connections import (
    READ_LIMIT,
    ValueParts,
    large_values_connection_class,
    round_trip,
)

from redis_helpers import RedisProcess


def test_a_value_in_parts_packs_to_the_bytes_of_the_joined_value() -> None:
    payload = payload_view(torch.arange(5000, dtype=torch.int32))
    header = b"HEADER"
    connection = large_values_connection_class(Connection)
    assert connection is not None
    joined = b"".join(connection().pack_command("SET", "name", header + bytes(payload)))
    in_parts = connection().pack_command("SET", "name", ValueParts(header, payload))
    assert b"".join(in_parts) == joined
    # The payload goes out as the tensor's own memory, not a copy.
    assert any(isinstance(p, memoryview) and p.obj is payload.obj for p in in_parts)


def test_a_pipeline_keeps_the_payload_as_it_is() -> None:
    payload = payload_view(torch.ones(1 << 16, dtype=torch.float16))
    connection = large_values_connection_class(Connection)
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
    connection = large_values_connection_class(Connection)
    assert connection is not None
    args = ("SET", "key", b"x" * 10000, "EX", 5)
    assert connection().pack_command(*args) == Connection().pack_command(*args)


def test_every_connection_kind_has_a_parts_subclass() -> None:
    for base in (Connection, SSLConnection, UnixDomainSocketConnection):
        parts_class = large_values_connection_class(base)
        assert parts_class is not None and issubclass(parts_class, base)
    assert large_values_connection_class(type("Other", (Connection,), {})) is None


def test_joined_into_writes_the_concatenation() -> None:
    parts = ValueParts(b"abc", memoryview(b"defgh"))
    out = memoryview(bytearray(16))
    assert bytes(parts.joined_into(out)) == b"abcdefgh"
    assert parts.nbytes == 8


@pytest.mark.redis
async def test_the_transport_gets_the_payload_itself_and_the_server_the_value(
    redis_server: RedisProcess,
) -> None:
    # Python 3.11's socket transport joins what ``writelines`` is given into one new bytes
    # object: a copy of every payload, which the parts connection avoids.
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    try:
        parts_class = large_values_connection_class(client.connection_pool.connection_class)
        assert parts_class is not None
        client.connection_pool.connection_class = parts_class
        await client.ping()
        connection = client.connection_pool._available_connections[0]
        transport = connection._writer.transport  # type: ignore[attr-defined]
        assert connection._reader._limit == READ_LIMIT  # type: ignore[attr-defined]
        # What reaches the socket layer as it is: ``write``'s data, and ``writelines``' where
        # the transport has its own (the default joins the chunks, then calls ``write``).
        methods = ["write"]
        if type(transport).writelines is not asyncio.WriteTransport.writelines:
            methods.append("writelines")
        given: list[Any] = []
        for method in methods:
            original = getattr(transport, method)

            def spy(data: Any, original: Any = original) -> None:
                given.extend(data if isinstance(data, list) else [data])
                original(data)

            setattr(transport, method, spy)
        payload = payload_view(torch.arange(1 << 18, dtype=torch.int32))
        value = b"HEADER" + bytes(payload)

        await client.set("single", ValueParts(b"HEADER", payload))  # type: ignore[arg-type]
        assert any(isinstance(c, memoryview) and c.obj is payload.obj for c in given)
        assert await client.get("single") == value

        given.clear()
        pipe = client.pipeline(transaction=False)
        for name in ("a", "b"):
            pipe.set(name, ValueParts(b"HEADER", payload))  # type: ignore[arg-type]
        pipe.get("single")
        assert await pipe.execute() == [True, True, value]
        payloads = [c for c in given if isinstance(c, memoryview) and c.obj is payload.obj]
        assert len(payloads) == 2
        assert await client.mget("a", "b") == [value, value]
    finally:
        await client.aclose()


@pytest.fixture
async def one_connection(redis_server: RedisProcess) -> AsyncIterator[ConnectionPool]:
    """A pool of at most one connection: every round trip reuses the same one."""
    pool = ConnectionPool.from_url(redis_server.url, max_connections=1)
    yield pool
    await pool.disconnect()


@pytest.mark.redis
async def test_a_round_trip_answers_each_command_in_order_with_errors_in_place(
    one_connection: ConnectionPool,
) -> None:
    commands = [("SET", "a", b"1"), ("LPUSH", "a", b"x"), ("GET", "a"), ("DEL", "nothing")]
    replies = await round_trip(one_connection, commands)
    assert replies[0] == b"OK" and replies[2] == b"1" and replies[3] == 0
    assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
    assert await round_trip(one_connection, [("GET", "a")]) == [b"1"]  # still in step


@pytest.mark.redis
async def test_a_cancelled_round_trip_leaves_no_reply_for_the_next(
    one_connection: ConnectionPool,
) -> None:
    await round_trip(one_connection, [("SET", "a", b"1")])
    # The server answers BLPOP (None) after 0.3 s: long after the caller gave up on it.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(round_trip(one_connection, [("BLPOP", "empty", "0.3")]), 0.05)
    assert await round_trip(one_connection, [("GET", "a")]) == [b"1"]
