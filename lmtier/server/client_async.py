"""The asyncio half of ``ServerClient``: calls that await the server without blocking a loop.

Kept apart from the connection (``lmtier.server.client``), which owns the socket, the regions
and the bookkeeping of replies: here a put or get lays its blocks out in a region of its own,
submits one job and awaits its reply, woken by the socket's readiness on the caller's loop.
``ServerClient``'s async methods call these.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from lmtier.errors import LmtierError
from lmtier.evictor import PutStatus
from lmtier.keys import KeyLike, check_key
from lmtier.server import protocol as p
from lmtier.server.client_wire import LoadResult, as_bytes, checked, dtype_from_name, layout

if TYPE_CHECKING:
    from lmtier.server.client import ServerClient

__all__ = ["await_reply", "get_many", "put_many"]


async def put_many(
    client: ServerClient, items: Iterable[tuple[KeyLike, torch.Tensor]]
) -> list[PutStatus]:
    """Store each tensor under its key; TierUnavailableError if the server is down."""
    batch = [(check_key(key), as_bytes(tensor)) for key, tensor in items]
    if not batch:
        return []
    offsets, total = layout(block.numel() for _, (block, _) in batch)
    region = client.map_region(total)
    try:
        for offset, (_, (block, _)) in zip(offsets, batch, strict=True):
            region.view(offset, block.numel()).copy_(block)
        job = client.submit_store(
            [key for key, _ in batch],
            region,
            offsets,
            [block.numel() for _, (block, _) in batch],
            dtypes=[tensor.dtype for _, (_, tensor) in batch],
            shapes=[tensor.shape for _, (_, tensor) in batch],
        )
        outcome = await client._await_reply(job)
    finally:
        client.unmap_region(region)
    client._jobs.pop(job, None)
    reply = checked(outcome)
    assert isinstance(reply, p.Stored)
    return [PutStatus.LEGAL if placed else PutStatus.ILLEGAL for placed in reply.placed]


async def get_many(client: ServerClient, keys: Sequence[KeyLike]) -> list[torch.Tensor | None]:
    """A CPU copy of each key's entry, or None (a miss, or the server unreachable)."""
    keys = [check_key(key) for key in keys]
    results: list[torch.Tensor | None] = [None] * len(keys)
    wanted = {i: client._slot_hint for i in range(len(keys))}
    while wanted:  # a second round for the entries larger than the room first given
        indexes = list(wanted)
        offsets, total = layout(wanted[i] for i in indexes)
        region = client.map_region(max(total, 1))
        try:
            job = client.submit_load(
                [keys[i] for i in indexes], region, offsets, [wanted[i] for i in indexes]
            )
            result = client._result(job, await client._await_reply(job))
            assert isinstance(result, LoadResult)
            wanted = {}
            for i, offset, found in zip(indexes, offsets, result.found, strict=True):
                if found is None:
                    continue
                client._slot_hint = max(client._slot_hint, found.nbytes)
                if not found.copied:
                    wanted[i] = found.nbytes
                    continue
                data = region.view(offset, found.nbytes).clone()
                results[i] = data.view(dtype_from_name(found.dtype)).reshape(found.shape)
        finally:
            client.unmap_region(region)
    return results


async def await_reply(client: ServerClient, job_id: int) -> p.Reply | LmtierError:
    """The reply to ``job_id``, awaited without blocking the loop: the socket's readiness
    wakes every waiter of this loop, and each one reads what came."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + client.timeout
    with client._lock:
        client._claimed.add(job_id)
    try:
        while True:
            with client._lock:
                client._pump()
                if job_id in client._done:
                    return client._done.pop(job_id)
                ready: asyncio.Future[None] = loop.create_future()
                client._async_waiters.setdefault(loop, []).append(ready)
                if client._sock is not None and loop not in client._reader_fd:
                    fd = client._sock.fileno()
                    loop.add_reader(fd, client._wake_loop, loop)
                    client._reader_fd[loop] = fd
            try:
                await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return client._give_up(job_id)
            finally:
                with client._lock:
                    waiters = client._async_waiters.get(loop, [])
                    if ready in waiters:
                        waiters.remove(ready)
    finally:
        with client._lock:
            client._claimed.discard(job_id)
