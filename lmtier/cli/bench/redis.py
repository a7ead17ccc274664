"""Rows for the redis tier: store puts and gets of whole chunks against
redis-py SET/GET of the same bytes on the same server, measured side by side in one run."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

import torch

from lmtier.cli.bench.core import Goal, MiB, Row, Scale, Side, atimed, make_store, touched
from lmtier.config import TierConfig
from lmtier.serde import payload_view
from lmtier.sizes import human_bytes

__all__ = ["local_redis_server", "remote_bench_rows", "remote_rows"]

BATCH = 16


async def remote_rows(url: str, nbytes: int, repeats: int) -> list[Row]:
    """put / get(out=) of one chunk and put_many of ``BATCH`` chunks, against SET, GET and a
    pipeline of SETs of the same bytes."""
    import redis.asyncio as aioredis

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    out = touched(torch.empty_like(src))
    raw = bytes(payload_view(src))
    batch = [(f"b{i}", src) for i in range(BATCH)]
    prefix = f"lmtier-bench-{uuid.uuid4().hex[:8]}"
    tier = TierConfig("remote", "redis", 4 * BATCH * nbytes, url=url, key_prefix=prefix)
    client = aioredis.Redis.from_url(url)

    async def raw_batch() -> None:
        pipe = client.pipeline(transaction=False)
        for i in range(BATCH):
            pipe.set(f"{prefix}-raw{i}", raw)
        await pipe.execute()

    samples: dict[str, list[float]] = {n: [] for n in ("put", "get", "set", "GET", "pm", "pl")}
    try:
        async with make_store(tier) as store:
            await store.put("k", src)
            raw_name = f"{prefix}-raw"
            await client.set(raw_name, raw)
            pairs = [
                (("put", lambda: store.put("k", src)), ("set", lambda: client.set(raw_name, raw))),
                (("get", lambda: store.get("k", out=out)), ("GET", lambda: client.get(raw_name))),
                (("pm", lambda: store.put_many(batch)), ("pl", raw_batch)),
            ]
            for turn in range(repeats):
                for pair in pairs:  # each side first in every other turn: no position bias
                    for name, operation in pair if turn % 2 else pair[::-1]:
                        samples[name].append(await atimed(operation))
            assert torch.equal(out, src)
            for key in ["k", *(key for key, _ in batch)]:
                await store.delete(key)
        await client.delete(f"{prefix}-raw", *(f"{prefix}-raw{i}" for i in range(BATCH)))
    finally:
        await client.aclose()
    size = human_bytes(nbytes)
    one, many = Scale.throughput(nbytes), Scale.throughput(BATCH * nbytes)

    def side(name: str, scale: Scale, note: str = "") -> Side:
        return Side(tuple(samples[name]), scale, note)

    return [
        Row(f"redis put {size}", side("put", one), side("set", one, "SET"), Goal.ratio(0.8)),
        Row(f"redis get(out=) {size}", side("get", one), side("GET", one, "GET"), Goal.ratio(0.8)),
        Row(f"redis put_many {BATCH} x {size}", side("pm", many), side("pl", many, "pipeline")),
    ]


@contextlib.contextmanager
def local_redis_server() -> Iterator[str | None]:
    """A throwaway redis-server on a free loopback port (its URL), or None if not installed."""
    if shutil.which("redis-server") is None:
        yield None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="lmtier-bench-redis-") as folder:
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        command += ["--appendonly", "no", "--dir", folder]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("a local redis-server did not start")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}"
        finally:
            server.kill()
            server.wait()


def remote_bench_rows(url: str | None, repeats: int) -> list[Row]:
    """The redis rows on ``url``, else on a local server; none without redis-py or a server."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return []
    with contextlib.ExitStack() as stack:
        if url is None:
            url = stack.enter_context(local_redis_server())
        if url is None:
            return []
        return asyncio.run(remote_rows(url, 2 * MiB, repeats))
