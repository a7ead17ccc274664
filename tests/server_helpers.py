"""A real ``lmtier serve`` child process on a private socket, and waits on conditions."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lmtier.errors import LmtierError
from lmtier.server import ServerClient, SharedRegion

REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 90.0  # torch's import alone takes seconds on a loaded machine

BLOCK = 256 * 1024
BLOCKS = 64


def blocks_for(tag: str, count: int = BLOCKS) -> torch.Tensor:
    """``count`` distinct float16 blocks of 256 KiB, derived from ``tag``."""
    generator = torch.Generator().manual_seed(sum(tag.encode()) * 7919)
    return torch.randn(count, BLOCK // 2, generator=generator).to(torch.float16)


def store_blocks(client: ServerClient, keys: list[str], data: torch.Tensor) -> SharedRegion:
    region = client.map_region(data.numel() * data.element_size())
    region.tensor.copy_(data.reshape(-1).view(torch.uint8))
    offsets = [i * BLOCK for i in range(len(keys))]
    shapes = [list(data[0].shape)] * len(keys)
    job = client.submit_store(
        keys, region, offsets, [BLOCK] * len(keys), dtypes=[data.dtype] * len(keys), shapes=shapes
    )
    result = client.wait(job)
    assert result.error is None and all(result.placed), result
    return region


def disk_config(folder: Path) -> Path:
    """A one-tier store config: a disk tier of 1 GB in ``folder/disk``."""
    config = folder / "store.yaml"
    config.write_text(
        f"tiers:\n  - name: disk\n    kind: disk\n    max_size_gb: 1\n    path: {folder / 'disk'}\n"
    )
    return config


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Until ``condition()`` is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        select.select([], [], [], 0.01)


class ServerProcess:
    """``python -m lmtier serve`` as a child; its stderr kept in ``log``."""

    def __init__(self, config: Path, socket_path: Path, program: list[str] | None = None) -> None:
        self.config = config
        self.socket_path = socket_path
        # What runs in place of ``-m lmtier serve`` (given the same arguments), if not it.
        self.program = program or ["-m", "lmtier", "serve"]
        self.process: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._serving = threading.Event()

    def start(self) -> ServerProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._serving.clear()
        command = [sys.executable, *self.program, "--config", str(self.config)]
        self.process = subprocess.Popen(
            [*command, "--socket", str(self.socket_path)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._drain, args=(self.process,), daemon=True).start()
        if not self._serving.wait(STARTUP_S):
            self.kill()
            raise AssertionError(f"the server did not start: {''.join(self.log)}")
        with ServerClient(self.socket_path) as client:
            assert client.ping() == self.process.pid
        return self

    def _drain(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.log.append(line)
            if "serving on" in line:
                self._serving.set()
        self._serving.set()  # it ended: start() reports what it said

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.log)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def shared_mappings(self) -> int:
        """How many mappings of client regions the server holds."""
        maps = Path(f"/proc/{self.pid}/maps").read_text()
        return sum("memfd:lmtier-region" in line for line in maps.splitlines())


def answers(client: ServerClient) -> bool:
    try:
        client.ping(timeout=30)
    except LmtierError:
        return False
    return True


def serve_disk_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A module fixture's body: an ``lmtier serve`` process over a disk tier, stopped cleanly
    (exit 0, its socket removed) after the module's tests."""
    folder = tmp_path_factory.mktemp("server")
    process = ServerProcess(disk_config(folder), folder / "run" / "lmtier.sock").start()
    yield process
    assert process.stop() == 0, "".join(process.log)
    assert not process.socket_path.exists()
