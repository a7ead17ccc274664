"""Engine-thread cost per 256 KiB block loaded: through ``lmtier serve`` vs in process.

    python scripts/bench_server.py [--blocks 64] [--rounds 20]

A Python busy-loop thread holds the GIL as an engine's loop does.  The calling thread loads a
batch of blocks from a disk tier and, between its checks for completion, runs a 1 ms Python
step of its own; the time it spends inside the store's calls (submit and poll for the server's
client; ``BlockingStore.submit`` and its future's ``done``/``result`` in process) is its cost.
Both stores hold the same blocks in disk tiers of the same config, page cache warm, in one run.
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

import torch

from lmtier.errors import LmtierError
from lmtier.integrations.blocking import BlockingStore
from lmtier.server import ServerClient

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


def engine_step() -> None:
    end = time.perf_counter() + STEP_S
    while time.perf_counter() < end:
        pass


def measure(load: Callable[[], tuple[float, bool]], rounds: int) -> tuple[float, float, float]:
    """Seconds inside the calls and wall seconds per round, with the busy loop running; and
    the busy loop's turns per second meanwhile (what the store's own threads left it)."""
    load()  # warm: pages cached, connection made
    in_calls = wall = 0.0
    with BusyLoop() as busy:
        for _ in range(rounds):
            start = time.perf_counter()
            spent, ok = load()
            wall += time.perf_counter() - start
            assert ok, "a block was missing"
            in_calls += spent
        turns = busy.turns
    return in_calls / rounds, wall / rounds, turns / wall


def server_load(client: ServerClient, keys: list[str], region: object) -> Callable[..., object]:
    offsets = [i * BLOCK for i in range(len(keys))]
    sizes = [BLOCK] * len(keys)

    def load() -> tuple[float, bool]:
        start = time.perf_counter()
        client.submit_load(keys, region, offsets, sizes)  # type: ignore[arg-type]
        spent = time.perf_counter() - start
        while True:
            start = time.perf_counter()
            done = client.poll()
            spent += time.perf_counter() - start
            if done:
                return spent, all(f is not None and f.copied for f in done[0].found)
            engine_step()

    return load


def blocking_load(store: BlockingStore, keys: list[str]) -> Callable[..., object]:
    def load() -> tuple[float, bool]:
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
            engine_step()

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
            via_server = measure(server_load(client, keys, region), args.rounds)
            client.close()
        finally:
            server.terminate()
            server.wait(60)
        with BlockingStore({"tiers": [{"name": "disk", "kind": "disk", "max_size_gb": 2,
                                       "path": str(folder / "local-disk")}]}) as store:  # fmt: skip
            store.put_many(zip(keys, data, strict=True))
            in_process = measure(blocking_load(store, keys), args.rounds)
    print(f"{args.blocks} blocks of 256 KiB per load, {args.rounds} rounds, a busy GIL thread")
    print(f"{'path':<26}{'engine µs/block':>16}{'wall µs/block':>15}{'busy Mturns/s':>15}")
    for name, (in_calls, wall, turns) in (
        ("lmtier serve (client)", via_server),
        ("BlockingStore in process", in_process),
    ):
        engine, elapsed = in_calls / args.blocks * 1e6, wall / args.blocks * 1e6
        print(f"{name:<26}{engine:>16.1f}{elapsed:>15.1f}{turns / 1e6:>15.2f}")
    print(f"engine-thread cost, in process / server: {in_process[0] / via_server[0]:.2f}x")


if __name__ == "__main__":
    main()
