"""``lmtier serve`` as a real child process, and ``ServerClient`` against it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import torch

from lmtier.errors import StorageError, TierUnavailableError
from lmtier.evictor import PutStatus
from lmtier.server import ServerClient, SharedRegion
from lmtier.server import protocol as p
from lmtier.server.paths import prepare_folder

from server_helpers import (
    BLOCK,
    BLOCKS,
    REPO,
    ServerProcess,
    answers,
    blocks_for,
    disk_config,
    serve_disk_store,
    store_blocks,
    wait_for,
)

NOBODY = 65534


def load_blocks(client: ServerClient, keys: list[str], region: SharedRegion) -> list[bool]:
    """Which keys hit; a hit's bytes are in ``region`` at ``i * BLOCK``."""
    job = client.submit_load(
        keys, region, [i * BLOCK for i in range(len(keys))], [BLOCK] * len(keys)
    )
    result = client.wait(job)
    return [found is not None and found.copied for found in result.found]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve_disk_store(tmp_path_factory)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[ServerClient]:
    with ServerClient(server.socket_path) as made:
        yield made


def raw_socket(server: ServerProcess) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(server.socket_path))
    return sock


def read_reply(sock: socket.socket) -> p.Reply | None:
    """The next reply on a raw socket, None at its end."""
    header = sock.recv(4, socket.MSG_WAITALL)
    if not header:
        return None
    (length,) = struct.unpack("<I", header)
    return p.decode_reply(sock.recv(length, socket.MSG_WAITALL))


# ---------------------------------------------------------------------- the data path
def test_socket_is_private(server: ServerProcess) -> None:
    assert server.socket_path.stat().st_mode & 0o777 == 0o600
    assert server.socket_path.parent.stat().st_mode & 0o777 == 0o700


def test_64_blocks_round_trip_bit_exact_through_shared_memory(client: ServerClient) -> None:
    keys = [f"round-trip/{i}" for i in range(BLOCKS)]
    data = blocks_for("round-trip")
    store_blocks(client, keys, data)
    target = client.map_region(BLOCKS * BLOCK)
    target.tensor.fill_(0xAA)
    job = client.submit_load(keys, target, [i * BLOCK for i in range(BLOCKS)], [BLOCK] * BLOCKS)
    finished: list[object] = []
    wait_for(lambda: finished.extend(client.poll()) or finished, "the load job to finish")
    (result,) = finished
    assert result.job_id == job and result.error is None
    assert all(f is not None and f.copied and f.dtype == "float16" for f in result.found)
    assert result.found[0].shape == [BLOCK // 2]
    loaded = target.tensor.view(torch.float16).reshape(BLOCKS, BLOCK // 2)
    assert torch.equal(loaded.view(torch.int16), data.view(torch.int16))
    assert client.poll() == []  # a job is returned once


def test_a_miss_and_a_block_too_large_for_its_room(client: ServerClient) -> None:
    store_blocks(client, ["room/0"], blocks_for("room", 1))
    target = client.map_region(2 * BLOCK)
    target.tensor.fill_(7)
    result = client.wait(client.submit_load(["room/0", "room/none"], target, [0, BLOCK], [100, 0]))
    found, missing = result.found
    assert missing is None
    assert found is not None and not found.copied and found.nbytes == BLOCK
    assert bool((target.tensor == 7).all())  # nothing written where it did not fit


async def test_python_api_through_the_server(client: ServerClient) -> None:
    value = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    big = torch.randn(600_000)  # larger than the room a first get gives an unseen entry
    assert await client.put("api/a", value) is PutStatus.LEGAL
    assert await client.put_many([("api/b", big)]) == [PutStatus.LEGAL]
    got_a, got_b, missing = await client.get_many(["api/a", "api/b", "api/none"])
    assert got_a is not None and torch.equal(got_a, value) and got_a.dtype == torch.int32
    assert got_b is not None and torch.equal(got_b, big)
    assert missing is None
    assert await client.contains("api/a") == "disk"
    assert await client.delete("api/a") is True
    assert await client.get("api/a") is None
    assert (await client.stats())["store"]["entries"] >= 1


def test_two_clients_share_one_store(server: ServerProcess) -> None:
    keys = [f"shared/{i}" for i in range(BLOCKS)]
    data = blocks_for("shared")
    with ServerClient(server.socket_path) as writer, ServerClient(server.socket_path) as reader:
        store_blocks(writer, keys, data)
        target = reader.map_region(BLOCKS * BLOCK)
        assert all(load_blocks(reader, keys, target))
        assert torch.equal(target.tensor, data.reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------------- failures
_KILLED_CLIENT = textwrap.dedent(
    """
    import sys, torch
    from lmtier.server import ServerClient
    client = ServerClient(sys.argv[1])
    region = client.map_region(64 * 262144)
    data = torch.randint(0, 256, (64 * 262144,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(5))
    region.tensor.copy_(data)
    keys = [f"killed/{i}" for i in range(64)]
    offsets = [i * 262144 for i in range(64)]
    assert all(client.wait(client.submit_store(keys, region, offsets, [262144] * 64)).placed)
    client.submit_store([f"killed/late/{i}" for i in range(64)], region, offsets, [262144] * 64)
    client.submit_load(keys, region, offsets, [262144] * 64)
    print("submitted", flush=True)
    sys.stdin.read()  # until killed
    """
)


def test_a_client_killed_mid_job_leaves_the_server_consistent(server: ServerProcess) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, str(server.socket_path)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "submitted"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        child.kill()
    with ServerClient(server.socket_path) as client:
        wait_for(lambda: client.server_stats()["server"]["connections"] == 1, "the child's end")
        # Its region is unmapped once its jobs are done, and nothing of it stays pinned.
        wait_for(lambda: server.shared_mappings() == 0, "the child's region to be released")
        stats = client.server_stats()
        assert stats["server"]["regions"] == 0
        assert stats["store"]["pinned_entries"] == 0
        expected = torch.randint(
            0, 256, (BLOCKS * BLOCK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
        )
        target = client.map_region(BLOCKS * BLOCK)
        assert all(load_blocks(client, [f"killed/{i}" for i in range(BLOCKS)], target))
        assert torch.equal(target.tensor, expected)
        # The store job it left may have finished or not: every block is whole, or absent.
        target.tensor.zero_()
        late = load_blocks(client, [f"killed/late/{i}" for i in range(BLOCKS)], target)
        for i, hit in enumerate(late):
            if hit:
                assert torch.equal(
                    target.view(i * BLOCK, BLOCK), expected[i * BLOCK : (i + 1) * BLOCK]
                )


def test_malformed_and_truncated_frames_get_an_error_and_the_server_keeps_serving(
    server: ServerProcess, client: ServerClient
) -> None:
    with raw_socket(server) as sock:
        sock.sendall(struct.pack("<I", 3) + b"\xc1\xc1\xc1")  # 0xc1: never valid msgpack
        reply = read_reply(sock)
        assert isinstance(reply, p.Error) and reply.kind == "MalformedMessage"
        wrong_fields = msgspec.msgpack.encode(["Load", 5, "not a list"])
        sock.sendall(struct.pack("<I", len(wrong_fields)) + wrong_fields)
        reply = read_reply(sock)
        assert isinstance(reply, p.Error) and "malformed message" in reply.message
        sock.sendall(p.encode_frame(p.Load(6, ["k"], region=9, offsets=[0], sizes=[1])))
        reply = read_reply(sock)
        assert (
            isinstance(reply, p.Error)
            and reply.id == 6
            and "region 9 is not mapped" in reply.message
        )
        sock.sendall(p.encode_frame(p.MapRegion(7, region=1, size=4096)))  # no descriptor
        reply = read_reply(sock)
        assert isinstance(reply, p.Error) and "without a file descriptor" in reply.message
        sock.sendall(p.encode_frame(p.Ping(8)))  # the same connection still serves
        assert isinstance(read_reply(sock), p.Pong)
        sock.sendall(struct.pack("<I", 0xFFFFFFFF))  # a length no frame may have: closed
        reply = read_reply(sock)
        assert isinstance(reply, p.Error) and reply.kind == "FrameError"
        assert read_reply(sock) is None
    with raw_socket(server) as sock:
        frame = p.encode_frame(p.Ping(1))
        sock.sendall(frame[: len(frame) - 2])
        sock.shutdown(socket.SHUT_WR)
        assert read_reply(sock) is None
    wait_for(lambda: server.logged("closed mid-frame"), "the truncated frame to be logged")
    assert client.ping() == server.pid


def test_a_stuck_client_does_not_hold_up_the_others(
    server: ServerProcess, client: ServerClient
) -> None:
    half = raw_socket(server)
    flood = raw_socket(server)
    try:
        half.sendall(p.encode_frame(p.Ping(1))[:5])  # half a frame, then nothing
        flood.setblocking(False)
        pings = b"".join(p.encode_frame(p.Ping(i)) for i in range(1, 2001))
        sent = 0
        try:  # requests it never reads the answers of, until the server stops reading it
            while sent < 200 * len(pings):
                sent += flood.send(pings)
        except BlockingIOError:
            pass
        keys = [f"stuck/{i}" for i in range(BLOCKS)]
        data = blocks_for("stuck")
        store_blocks(client, keys, data)
        target = client.map_region(BLOCKS * BLOCK)
        assert all(load_blocks(client, keys, target))
        assert torch.equal(target.tensor, data.reshape(-1).view(torch.uint8))
    finally:
        half.close()
        flood.close()


def _connect_as_nobody(path: Path) -> str:
    """In a child that became uid 65534: what connecting to ``path`` gave."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        outcome = "connected"
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(str(path))
            reply = read_reply(sock)
            outcome = f"reply {reply!r}" if reply is not None else "closed"
            if isinstance(reply, p.Error) and read_reply(sock) is None:
                outcome = f"refused: {reply.message}"
        except PermissionError as exc:
            outcome = f"PermissionError: {exc}"
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, outcome.encode()[:4000])
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as answer:
            return answer.read().decode()
    finally:
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user (nobody) needs root")
def test_another_user_cannot_connect(tmp_path: Path) -> None:
    # Under a folder that other users may cross (pytest's own is closed to them).
    outer = Path(tempfile.mkdtemp(prefix="lmtier-server-test-"))
    os.chmod(outer, 0o711)
    server = ServerProcess(disk_config(tmp_path), outer / "run" / "lmtier.sock").start()
    try:
        # The folder (0700) keeps it out first...
        assert _connect_as_nobody(server.socket_path).startswith("PermissionError")
        # ...and with the folder and socket opened up, the server checks the peer's uid.
        os.chmod(server.socket_path.parent, 0o711)
        os.chmod(server.socket_path, 0o666)
        outcome = _connect_as_nobody(server.socket_path)
        assert outcome.startswith("refused:") and f"uid {NOBODY}" in outcome, outcome
        assert server.logged("refused pid")
        with ServerClient(server.socket_path) as client:
            os.chmod(server.socket_path.parent, 0o700)  # the client checks the folder too
            assert client.ping() == server.pid
    finally:
        server.kill()
        shutil.rmtree(outer)


def test_the_folder_must_be_private_and_this_users(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    prepare_folder(folder)
    assert folder.stat().st_mode & 0o777 == 0o700
    os.chmod(folder, 0o755)
    with pytest.raises(StorageError, match="open to other users"):
        prepare_folder(folder)
    if os.geteuid() == 0:
        os.chmod(folder, 0o700)
        os.chown(folder, NOBODY, NOBODY)
        with pytest.raises(StorageError, match=f"belongs to uid {NOBODY}"):
            prepare_folder(folder)


def test_a_killed_server_gives_misses_and_errors_then_the_client_reconnects(
    tmp_path: Path,
) -> None:
    server = ServerProcess(disk_config(tmp_path), tmp_path / "run" / "lmtier.sock").start()
    try:
        client = ServerClient(server.socket_path, timeout=60)
        keys = [f"restart/{i}" for i in range(BLOCKS)]
        data = blocks_for("restart")
        store_blocks(client, keys, data)
        target = client.map_region(BLOCKS * BLOCK)
        in_flight = client.submit_load(
            keys, target, [i * BLOCK for i in range(BLOCKS)], [BLOCK] * BLOCKS
        )
        server.kill()
        # The load that was in flight: every block it reports is whole, else a miss.
        result = client.wait(in_flight)
        for i, found in enumerate(result.found):
            if found is not None:
                assert torch.equal(target.view(i * BLOCK, BLOCK), data[i].view(torch.uint8))
        target.tensor.fill_(0x55)
        assert not any(load_blocks(client, keys, target))
        assert bool((target.tensor == 0x55).all())  # nothing written, nothing reported
        failed = client.wait(client.submit_store(keys[:1], target, [0], [BLOCK]))
        assert failed.placed == [False] and failed.error is not None
        with pytest.raises(TierUnavailableError):
            client.ping()

        async def python_api() -> None:
            assert await client.get(keys[0]) is None
            with pytest.raises(TierUnavailableError):
                await client.put("restart/new", torch.ones(4))

        asyncio.run(python_api())

        server.start()  # the same folder: the entries are still there
        wait_for(lambda: answers(client), "the client to reconnect")
        assert all(load_blocks(client, keys, target))  # its region was mapped again
        assert torch.equal(target.tensor, data.reshape(-1).view(torch.uint8))
        client.close()
    finally:
        server.kill()
