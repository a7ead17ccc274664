"""``lmtier bench --peers``: the same chunks through LMCache 0.5.6's local backends, same run.

LMCache is loaded by ``lmtier.cli.bench.lmcache_peer`` (installed apart by
``scripts/install_peers.sh``).  Rows, each side's samples taken alternately with the other's:

- cpu put: ``TieredStore.put`` of a new key into a cpu memory tier, against LMCache's
  ``LocalCPUBackend.allocate`` + ``copy_`` into the ``MemoryObj`` + ``submit_put_task`` (what
  its storage manager does for a put).
- cpu get: ``TieredStore.get(key, out=)`` against ``LocalCPUBackend.get_blocking`` + ``copy_``
  out of the returned ``MemoryObj``.
- disk write: ``TieredStore.put`` into a disk-only store (it returns once the file is written,
  checksummed and renamed, and the key indexed) against ``LocalDiskBackend.submit_put_task`` of
  a filled ``MemoryObj``, waited for through its ``on_complete_callback``.  Both public.
- disk read: ``TieredStore.get(key, out=)`` from that store (checksum verified) against
  ``LocalDiskBackend.get_blocking`` (allocates from its ``LocalCPUBackend``, ``readinto``).
- the same two disk rows through the disk tier's private synchronous file functions
  (``write_published``, ``_read_file``), labelled "(private path)": what the store's
  asynchronous path adds is the difference between the two pairs of rows.

Both sides keep four chunks resident in their cpu rows, removing the oldest (untimed) before
the next put, so every timed put lands in memory its side has already used.  Disk writes go to
a new file on each side; which side writes first alternates from pair to pair, and both files
are removed (untimed) before the next pair, so neither side always writes under the other's
dirty pages (a fixed order with files left behind favoured lmtier 3-5x at 16 MiB on a 2-core
machine).  The bytes are the same on both sides: one bfloat16 KV chunk shaped as LMCache's
``KV_2LTD`` (2, layers, 256 tokens, 1024 hidden) when ``nbytes`` is a whole number of MiB.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from lmtier.cli.bench.core import Goal, MiB, Row, Scale, Side, atimed, make_store, timed, touched
from lmtier.cli.bench.lmcache_peer import LMCACHE_VERSION, Peer, kv_shape, peer, peers_available
from lmtier.config import TierConfig
from lmtier.evictor import LRUEvictor
from lmtier.sizes import human_bytes
from lmtier.tiers import DiskTier

__all__ = ["LMCACHE_VERSION", "peer_rows", "peers_available"]

RESIDENT = 4
WRITE_GOAL = Goal.ratio(1.5)
READ_GOAL = Goal.ratio(1.0)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    # random bytes make NaNs in bfloat16, and NaN != NaN: compare the bytes
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _names(nbytes: int) -> list[tuple[str, Goal | None]]:
    size = human_bytes(nbytes)
    return [
        (f"cpu put {size} vs LMCache LocalCPUBackend", None),
        (f"cpu get(out=) {size} vs LMCache get_blocking+copy_", None),
        (f"disk put {size} (store) vs LMCache LocalDiskBackend", WRITE_GOAL),
        (f"disk get(out=) {size} (store) vs LMCache LocalDiskBackend", READ_GOAL),
        (f"disk write {size} (private path) vs LMCache LocalDiskBackend", None),
        (f"disk read {size} (private path) vs LMCache LocalDiskBackend", None),
    ]


# ---------------------------------------------------------------------- cpu
async def _cpu_rows(nbytes: int, repeats: int, src: torch.Tensor, lmc: Peer) -> list[Row]:
    out = touched(torch.empty_like(src))
    put_s: list[float] = []
    get_s: list[float] = []
    peer_put_s: list[float] = []
    peer_get_s: list[float] = []
    async with make_store(TierConfig("cpu", "memory", 8 * nbytes)) as store:
        keys: list[str] = []
        peer_keys: list[Any] = []
        for turn in range(RESIDENT + 1 + repeats):
            if len(keys) == RESIDENT:  # the oldest goes (untimed): its memory takes the put
                await store.delete(keys.pop(0))
                lmc.cpu.remove(peer_keys.pop(0))
            key, peer_key = f"k{turn}", lmc.key()
            keys.append(key)
            peer_keys.append(peer_key)
            if turn % 2:  # each side first in every other turn
                peer_put = timed(lambda: lmc.cpu_put(peer_key, src))  # noqa: B023
                peer_get = timed(lambda: lmc.cpu_get(peer_key, out))  # noqa: B023
            put = await atimed(lambda: store.put(key, src))  # noqa: B023
            get = await atimed(lambda: store.get(key, out=out))  # noqa: B023
            if not turn % 2:
                peer_put = timed(lambda: lmc.cpu_put(peer_key, src))  # noqa: B023
                peer_get = timed(lambda: lmc.cpu_get(peer_key, out))  # noqa: B023
            if turn > RESIDENT:  # the first puts fill both sides' memory
                put_s.append(put)
                get_s.append(get)
                peer_put_s.append(peer_put)
                peer_get_s.append(peer_get)
    gbs = Scale.throughput(nbytes)
    (put_name, _), (get_name, _) = _names(nbytes)[:2]
    return [
        Row(put_name, Side(tuple(put_s), gbs), Side(tuple(peer_put_s), gbs)),
        Row(get_name, Side(tuple(get_s), gbs), Side(tuple(peer_get_s), gbs)),
    ]


# ---------------------------------------------------------------------- disk, public
async def _disk_store_rows(
    nbytes: int, repeats: int, src: torch.Tensor, lmc: Peer, folder: Path
) -> list[Row]:
    """The store's public put and get(out=) on a disk-only store against LMCache's public
    submit_put_task (waited for) and get_blocking."""
    tier = TierConfig("disk", "disk", (repeats + 8) * 2 * nbytes, path=str(folder))
    async with make_store(tier) as store:
        await store.put("warm", src)  # the first writes make folders and warm both paths
        await store.delete("warm")

        async def put(turn: int) -> float:
            return await atimed(lambda: store.put(f"k{turn}", src))

        async def remove(turn: int) -> None:
            await store.delete(f"k{turn}")

        write_s, peer_write_s = await _write_pairs(put, remove, lmc, src, repeats)
        await store.put("read", src)  # one entry each to read back, warm in the page cache
        out = touched(torch.empty_like(src))

        async def get() -> float:
            return await atimed(lambda: store.get("read", out=out))

        read_s, peer_read_s = await _read_pairs(get, lmc, src, repeats)
        if not _same_bytes(out, src):
            raise RuntimeError("lmtier's disk store read back different bytes")
        await store.delete("read")
    gbs = Scale.throughput(nbytes)
    (write_name, write_goal), (read_name, read_goal) = _names(nbytes)[2:4]
    return [
        Row(write_name, Side(tuple(write_s), gbs), Side(tuple(peer_write_s), gbs), write_goal),
        Row(read_name, Side(tuple(read_s), gbs), Side(tuple(peer_read_s), gbs), read_goal),
    ]


async def _write_pairs(
    ours: Callable[[int], Awaitable[float]],
    remove: Callable[[int], Awaitable[None]],
    lmc: Peer,
    src: torch.Tensor,
    repeats: int,
) -> tuple[list[float], list[float]]:
    """``repeats`` pairs of lmtier's timed write (``ours(turn)``) and LMCache's, each side
    first in every other pair (who writes first pays for the other's writeback); a new file
    per write on both sides, each removed untimed (``remove(turn)``) before the next pair."""
    warm_key = lmc.key()
    _disk_put(lmc, warm_key, src)
    lmc.disk.remove(warm_key)
    write_s: list[float] = []
    peer_write_s: list[float] = []
    for turn in range(repeats):
        peer_key, obj = lmc.key(), lmc.filled(src)  # its put source: a filled MemoryObj
        if turn % 2:
            peer_write_s.append(timed(lambda: lmc.disk_put(peer_key, obj)))  # noqa: B023
        write_s.append(await ours(turn))
        if not turn % 2:
            peer_write_s.append(timed(lambda: lmc.disk_put(peer_key, obj)))  # noqa: B023
        obj.ref_count_down()
        await remove(turn)
        lmc.disk.remove(peer_key)
    return write_s, peer_write_s


async def _read_pairs(
    ours: Callable[[], Awaitable[float]], lmc: Peer, src: torch.Tensor, repeats: int
) -> tuple[list[float], list[float]]:
    """``repeats`` pairs of lmtier's timed read (``ours()``) and LMCache's get_blocking of
    ``src``, each side first in every other pair, after one pair that only warms."""
    peer_key = lmc.key()
    _disk_put(lmc, peer_key, src)
    read_s: list[float] = []
    peer_read_s: list[float] = []
    got: list[Any] = []
    for turn in range(repeats + 1):
        if turn % 2:
            peer_read = timed(lambda: got.append(lmc.disk_get(peer_key)))
        read = await ours()
        if not turn % 2:
            peer_read = timed(lambda: got.append(lmc.disk_get(peer_key)))
        if not _same_bytes(got[-1].tensor, src):
            raise RuntimeError("LMCache LocalDiskBackend read back different bytes")
        got.pop().ref_count_down()
        if turn:
            read_s.append(read)
            peer_read_s.append(peer_read)
    lmc.disk.remove(peer_key)
    return read_s, peer_read_s


def _disk_put(lmc: Peer, key: Any, src: torch.Tensor) -> None:
    """LMCache's disk put of ``src`` (untimed: to warm up, or to have a chunk to read)."""
    obj = lmc.filled(src)
    try:
        lmc.disk_put(key, obj)
    finally:
        obj.ref_count_down()


# ---------------------------------------------------------------------- disk, private
def _disk_file_rows(
    nbytes: int, repeats: int, src: torch.Tensor, lmc: Peer, folder: Path
) -> list[Row]:
    """The disk tier's private synchronous file functions against LMCache's public path."""
    budget = (repeats + 8) * 2 * nbytes
    tier = DiskTier("disk", LRUEvictor(max_cache_bytes=budget), folder)
    asyncio.run(tier.open())
    written: list[str] = []
    try:
        meta = tier.write_published("warm", src)  # first writes make folders and warm both paths
        Path(meta.path).unlink()

        async def write(turn: int) -> float:
            return timed(lambda: written.append(tier.write_published("k", src).path))

        async def remove(turn: int) -> None:
            Path(written.pop()).unlink()

        write_s, peer_write_s = asyncio.run(_write_pairs(write, remove, lmc, src, repeats))
        meta = tier.write_published("read", src)
        written.append(meta.path)
        out = touched(torch.empty_like(src))

        async def read() -> float:
            return timed(lambda: tier._read_file(meta, out))

        read_s, peer_read_s = asyncio.run(_read_pairs(read, lmc, src, repeats))
        if not _same_bytes(out, src):
            raise RuntimeError("lmtier DiskTier read back different bytes")
    finally:
        asyncio.run(tier.close())
        for path in written:
            Path(path).unlink(missing_ok=True)
    gbs = Scale.throughput(nbytes)
    (write_name, _), (read_name, _) = _names(nbytes)[4:]
    return [
        Row(write_name, Side(tuple(write_s), gbs), Side(tuple(peer_write_s), gbs)),
        Row(read_name, Side(tuple(read_s), gbs), Side(tuple(peer_read_s), gbs)),
    ]


# ---------------------------------------------------------------------- the rows
def _unavailable_rows(nbytes: int, reason: str) -> list[Row]:
    return [Row(name, None, None, goal, reason) for name, goal in _names(nbytes)]


def peer_rows(nbytes: int, repeats: int, folder: Path) -> list[Row]:
    """lmtier's cpu and disk tiers beside LMCache 0.5.6's local backends on the same chunk.

    Where LMCache cannot be used here, the rows carry the reason in the baseline column and no
    ratio.  ``folder`` receives both sides' files (in a fresh sub-folder, removed afterwards).
    """
    reason = peers_available()
    if reason is not None:
        return _unavailable_rows(nbytes, reason)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).view(torch.bfloat16)
    src = src.view(kv_shape(nbytes))
    root = folder / f"peers-{uuid.uuid4().hex[:8]}"
    try:
        # LMCache 0.5.6's LocalDiskBackend.remove gives back its usage but not the size its
        # admission counts (current_cache_size): its budget must hold every put of the run,
        # two rows of ``repeats`` writes and a warm-up and a read each, or a put is refused.
        with peer(nbytes, root / "lmcache", 2 * (repeats + 2)) as lmc:
            rows = asyncio.run(_cpu_rows(nbytes, repeats, src, lmc))
            rows += asyncio.run(_disk_store_rows(nbytes, repeats, src, lmc, root / "store"))
            rows += _disk_file_rows(nbytes, repeats, src, lmc, root / "files")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m lmtier.cli.bench.peers [--repeats N] [--folder DIR] [MiB ...]``."""
    import argparse
    import tempfile

    from lmtier.cli.bench.core import format_rows

    parser = argparse.ArgumentParser(prog="python -m lmtier.cli.bench.peers")
    parser.add_argument("sizes", nargs="*", type=int, default=[2, 16], help="chunk sizes in MiB")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=args.folder, prefix="lmtier-peers-") as name:
        for mib in args.sizes:
            rows += peer_rows(mib * MiB, args.repeats, Path(name))
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
