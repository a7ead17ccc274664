"""BlockingStore at its edges: a close whose time runs out, and a store used after fork."""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from lmtier import PutStatus, StorageError, StoreClosedError, StoreForkedError
from lmtier.config import MetricsConfig, StoreConfig, TierConfig
from lmtier.integrations.blocking import BlockingStore
from lmtier.tiers import disk

from conftest import tensor_for
from store_helpers import KIB

# Every wait on another thread or process: far beyond what it takes on a loaded machine, and
# only ever reached when the code under test hangs.
HANG_S = 60.0


def _disk_config(root: Path, port: int = 0) -> StoreConfig:
    return StoreConfig(
        tiers=(TierConfig("disk", "disk", 64 * KIB, path=str(root / "disk")),),
        metrics=MetricsConfig(port=port, host="127.0.0.1"),
    )


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_an_expired_close_still_releases_the_folder_and_the_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    entered, release = threading.Event(), threading.Event()
    write_all = disk._write_all

    def stalled_write(fd: int, parts: Any) -> None:  # a write stuck in the kernel
        entered.set()
        release.wait(HANG_S)
        write_all(fd, parts)

    blocking = BlockingStore(_disk_config(tmp_path), thread_name="lmtier-expired")
    port = blocking.store.metrics_port
    assert port is not None
    assert blocking.put("before", tensor_for("before")) is PutStatus.LEGAL
    monkeypatch.setattr(disk, "_write_all", stalled_write)
    outcome: list[object] = []

    def stuck_put() -> None:
        try:
            outcome.append(blocking.put("stuck", tensor_for("stuck")))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=stuck_put)
    caller.start()
    try:
        assert entered.wait(HANG_S)
        with caplog.at_level(logging.WARNING, logger="lmtier.integrations.blocking"):
            blocking.close(timeout=0.2)
        caller.join(HANG_S)
        assert len(outcome) == 1 and isinstance(outcome[0], StoreClosedError), outcome
        assert blocking.closed and not blocking._runner.thread.is_alive()
        warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        assert "did not close within 0.2s" in warning and "BlockingStore.put" in warning, warning
        assert _port_is_free(port)
        monkeypatch.undo()
        # The same folder and the same port, in the same process, while the write still hangs.
        with BlockingStore(_disk_config(tmp_path, port), thread_name="lmtier-again") as again:
            assert again.store.metrics_port == port
            assert again.contains("before") == "disk"
            assert again.put("after", tensor_for("after")) is PutStatus.LEGAL
    finally:
        release.set()
        caller.join(HANG_S)
    stuck_workers = [t for t in threading.enumerate() if t.name.startswith("lmtier-expired-io")]
    for worker in stuck_workers:
        worker.join(HANG_S)
        assert not worker.is_alive()
    # What the released write left is a temporary file, which the next open removes.
    with BlockingStore(_disk_config(tmp_path)) as last:
        assert last.store.tiers[0].recovery.indexed == 2  # "before" and "after"
        assert last.contains("stuck") is None


def _in_child(blocking: BlockingStore, root: Path) -> str:
    """What a forked child sees: each step's outcome, in words."""
    seen = []
    try:
        blocking.get("a")
        seen.append("get answered")
    except StoreForkedError as exc:
        seen.append(f"forked: {exc}")
    try:
        blocking.submit(_nothing)
        seen.append("submit accepted")
    except StoreForkedError:
        seen.append("submit refused")
    blocking.close()  # the parent's store: nothing to do here
    seen.append(f"closed={blocking.closed}")
    with BlockingStore(_disk_config(root, port=0)) as own:  # what the error says to do
        seen.append(f"own store {own.put('c', tensor_for('c')).name}")
    return "\n".join(seen)


async def _nothing(store: Any) -> None:
    return None


def test_a_forked_child_gets_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    blocking = BlockingStore(_disk_config(tmp_path / "parent"), thread_name="lmtier-forked")
    assert blocking.put("a", tensor_for("a")) is PutStatus.LEGAL
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 0
        try:
            os.close(read)
            report = _in_child(blocking, tmp_path / "child")
        except BaseException as exc:
            report, code = f"raised {exc!r}", 1
        os.write(write, report.encode())
        os.close(write)
        os._exit(code)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], HANG_S)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        assert ready, "the forked child hung"
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        report = b"".join(chunks).decode()
    finally:
        os.close(read)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    lines = report.splitlines()
    assert lines[0].startswith("forked: ") and "open a new store in the child" in lines[0], report
    assert lines[1:] == ["submit refused", "closed=True", "own store LEGAL"], report
    # The parent's store is untouched by the child: it serves and still holds its folder.
    assert blocking.put("b", tensor_for("b")) is PutStatus.LEGAL
    assert blocking.contains("a") == "disk"
    with pytest.raises(StorageError, match="in use"):
        BlockingStore(_disk_config(tmp_path / "parent"))
    blocking.close()
