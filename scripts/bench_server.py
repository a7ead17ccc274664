"""Engine-thread cost, wall time and scheduler stall per 256 KiB block loaded from a disk tier.

    python scripts/bench_server.py [--blocks 64] [--rounds 20]

A Python busy-loop thread holds the GIL as an engine's loop does, with the interpreter's default
switch interval.  The calling thread loads a batch of blocks and, between its checks for
completion, runs a 1 ms Python step of its own; the time it spends inside the store's calls
(submit and poll for the server's client; ``BlockingStore.submit`` and its future's
``done``/``result`` in process) is its engine cost.  A probe thread sleeps 1 ms in a loop and
records how late it wakes: the stall an engine thread would see.  Three runs in one process:
(a) no lmtier work (engine steps only), (b) the in-process ``BlockingStore``, (c) ``lmtier
serve``; both stores hold the same blocks in disk tiers of the same config, page cache warm.
The raw baseline is ``os.preadv`` of the same bytes from files in the same folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmtier.cli.bench.stall import StallProbe
from lmtier.errors import LmtierError
from lmtier.integrations.blocking import BlockingStore
from lmtier.server import ServerClient, SharedRegion

BLOCK = 256 * 1024
STEP_S = 1e-3


class BusyLoop:
    """A thread that runs Python without a pause (an engine loop), counting its turns."""

    def __init__(self) -> None:
        self.turns = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for _ in range(100):
                self.turns += 1

    def __enter__(self) -> BusyLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def probe_ms(probe: StallProbe) -> tuple[float, float, float]:
    """The probe's lateness: p50, p99 and max, in ms."""
    summary = probe.summary()
    return summary["p50_ms"], summary["p99_ms"], summary["max_ms"]


def engine_step() -> None:
    end = time.perf_counter() + STEP_S
    while time.perf_counter() < end:
        pass


def engine_wait() -> None:
    """An engine waiting on its device between polls: asleep, the GIL free."""
    time.sleep(STEP_S)


Load = Callable[[Callable[[], None]], tuple[float, bool]]


class Result:
    """Per block: seconds inside the calls and wall seconds beside a busy engine loop; wall
    seconds beside a sleeping one; the probe's lateness (ms) meanwhile."""

    def __init__(self, in_calls: float, wall: float, wall_quiet: float, stall_ms: Any) -> None:
        self.in_calls = in_calls
        self.wall = wall
        self.wall_quiet = wall_quiet
        self.stall_ms: tuple[float, float, float] = stall_ms


def measure(load: Load, rounds: int, blocks: int) -> Result:
    """Two phases: the engine's cost with a busy loop holding the GIL and the engine stepping
    in Python between polls; then the stall probe, the engine sleeping between polls."""
    load(engine_wait)  # warm: pages cached, connection made
    in_calls = wall = 0.0
    with BusyLoop():
        for _ in range(rounds):
            start = time.perf_counter()
            spent, ok = load(engine_step)
            wall += time.perf_counter() - start
            assert ok, "a block was missing"
            in_calls += spent
    wall_quiet = 0.0
    with StallProbe() as probe:
        for _ in range(rounds):
            start = time.perf_counter()
            _, ok = load(engine_wait)
            wall_quiet += time.perf_counter() - start
            assert ok, "a block was missing"
    per_block = rounds * blocks
    return Result(in_calls / per_block, wall / per_block, wall_quiet / per_block, probe_ms(probe))


def idle_load(steps: int) -> Load:
    """No lmtier work: the engine's steps alone (about as many as a load's wait lasts)."""

    def load(between: Callable[[], None]) -> tuple[float, bool]:
        for _ in range(steps):
            between()
        return 0.0, True

    return load


def raw_read_s(folder: Path, data: torch.Tensor) -> float:
    """Seconds per block to ``os.preadv`` the blocks from files in ``folder`` (cache warm)."""
    folder.mkdir()
    paths = []
    for i, block in enumerate(data):
        path = folder / f"{i}.bin"
        path.write_bytes(block.numpy().tobytes())
        paths.append(path)
    out = torch.empty_like(data)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for path, row in zip(paths, out, strict=True):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.preadv(fd, [row.numpy()], 0)
            finally:
                os.close(fd)
        best = min(best, time.perf_counter() - start)
    assert torch.equal(out, data)
    return best / len(paths)


def server_load(client: ServerClient, keys: list[str], region: SharedRegion) -> Load:
    offsets = [i * BLOCK for i in range(len(keys))]
    sizes = [BLOCK] * len(keys)

    def load(between: Callable[[], None]) -> tuple[float, bool]:
        start = time.perf_counter()
        client.submit_load(keys, region, offsets, sizes)
        spent = time.perf_counter() - start
        while True:
            start = time.perf_counter()
            done = client.poll()
            spent += time.perf_counter() - start
            if done:
                return spent, all(f is not None and f.copied for f in done[0].found)
            between()

    return load


def blocking_load(store: BlockingStore, keys: list[str]) -> Load:
    def load(between: Callable[[], None]) -> tuple[float, bool]:
        start = time.perf_counter()
        future = store.submit(lambda s: s.get_many(keys))
        spent = time.perf_counter() - start
        while True:
            start = time.perf_counter()
            finished = future.done()
            values = future.result() if finished else None
            spent += time.perf_counter() - start
            if values is not None:
                return spent, all(v is not None for v in values)
            between()

    return load


def config_text(folder: Path) -> str:
    return f"tiers:\n  - name: disk\n    kind: disk\n    max_size_gb: 2\n    path: {folder}\n"


def start_server(config: Path, socket_path: Path) -> subprocess.Popen[bytes]:
    repo = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "lmtier", "serve", "--config", str(config)]
    process = subprocess.Popen(
        [*command, "--socket", str(socket_path)],
        cwd=repo,
        env=dict(os.environ, PYTHONPATH=str(repo)),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    for line in process.stderr:  # it says when it serves
        if b"serving on" in line:
            return process
    raise SystemExit(f"the server did not start (exit {process.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    keys = [f"bench/{i}" for i in range(args.blocks)]
    data = torch.randint(0, 256, (args.blocks, BLOCK), dtype=torch.uint8)
    with tempfile.TemporaryDirectory(prefix="lmtier-bench-server-") as tmp:
        folder = Path(tmp)
        raw = raw_read_s(folder / "raw", data)
        (folder / "server.yaml").write_text(config_text(folder / "server-disk"))
        server = start_server(folder / "server.yaml", folder / "run" / "sock")
        try:
            client = ServerClient(folder / "run" / "sock")
            region = client.map_region(args.blocks * BLOCK)
            region.tensor.copy_(data.reshape(-1))
            offsets = [i * BLOCK for i in range(args.blocks)]
            stored = client.wait(client.submit_store(keys, region, offsets, [BLOCK] * args.blocks))
            if not all(stored.placed):
                raise LmtierError(f"the server did not store every block: {stored}")
            via_server = measure(server_load(client, keys, region), args.rounds, args.blocks)
            client.close()
        finally:
            server.terminate()
            server.wait(60)
        with BlockingStore({"tiers": [{"name": "disk", "kind": "disk", "max_size_gb": 2,
                                       "path": str(folder / "local-disk")}]}) as store:  # fmt: skip
            store.put_many(zip(keys, data, strict=True))
            in_process = measure(blocking_load(store, keys), args.rounds, args.blocks)
        idle = measure(idle_load(10), args.rounds, args.blocks)
    print(f"{args.blocks} blocks of 256 KiB per load, {args.rounds} rounds per phase")
    print(f"raw os.preadv of the same bytes: {raw * 1e6:.1f} µs/block (page cache warm)")
    print("busy: a Python thread spins and the engine steps 1 ms in Python between polls;")
    print("quiet: the engine sleeps 1 ms between polls, a probe thread sleeps 1 ms in a loop")
    columns = ["engine µs/blk", "wall µs/blk", "/raw", "quiet wall", "/raw"]
    print(f"{'path':<20}" + "".join(f" {c:>13}" for c in columns) + "  stall p50/p99/max ms")
    for name, result in (
        ("(a) no lmtier work", idle),
        ("(b) BlockingStore", in_process),
        ("(c) lmtier serve", via_server),
    ):
        stall = "/".join(f"{ms:.2f}" for ms in result.stall_ms)
        if result is idle:
            cells = ["-"] * len(columns)
        else:
            cells = [
                f"{result.in_calls * 1e6:.1f}",
                f"{result.wall * 1e6:.1f}",
                f"{result.wall / raw:.1f}",
                f"{result.wall_quiet * 1e6:.1f}",
                f"{result.wall_quiet / raw:.1f}",
            ]
        print(f"{name:<20}" + "".join(f" {c:>13}" for c in cells) + f"  {stall}")


if __name__ == "__main__":
    main()
