"""The completion ring: a reply is counted only once its bytes are in the region and its frame
on the socket, a killed server counts nothing it did not finish, and a quiet poll is a memory
read."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmtier.errors import InvalidValueError
from lmtier.server import ServerClient, SharedRegion
from lmtier.server import client as client_module
from lmtier.server.ring import CompletionRing

from server_helpers import ServerProcess, disk_config, wait_for

BLOCK = 256 * 1024
BLOCKS = 8

# ``lmtier serve`` whose loads write their first half of blocks, then wait for the gate file.
_GATED_SERVER = textwrap.dedent(
    """
    import argparse, asyncio, pathlib, sys
    from lmtier.config import load_config
    from lmtier.server import process, service

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--socket")
    parser.add_argument("--gate")
    args = parser.parse_args()
    real = service.load_into_region
    gate = pathlib.Path(args.gate)

    async def gated(store, region, keys, offsets, sizes):
        half = len(keys) // 2
        await real(store, region, keys[:half], offsets[:half], sizes[:half])
        while not gate.exists():
            await asyncio.sleep(0.01)
        return await real(store, region, keys, offsets, sizes)

    service.load_into_region = gated

    def ready(path):
        print(f"lmtier: serving on {path}", file=sys.stderr, flush=True)

    asyncio.run(process.serve(load_config(args.config), pathlib.Path(args.socket), ready))
    """
)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    gate = tmp_path / "gate"
    program = ["-c", _GATED_SERVER, "--gate", str(gate)]
    process = ServerProcess(disk_config(tmp_path), tmp_path / "run" / "sock", program).start()
    try:
        yield process, gate
    finally:
        process.kill()


def stored_blocks(client: ServerClient) -> tuple[list[str], torch.Tensor]:
    keys = [f"ring/{i}" for i in range(BLOCKS)]
    data = torch.randint(0, 256, (BLOCKS * BLOCK,), dtype=torch.uint8)
    source = client.map_region(BLOCKS * BLOCK)
    source.tensor.copy_(data)
    offsets = [i * BLOCK for i in range(BLOCKS)]
    assert all(client.wait(client.submit_store(keys, source, offsets, [BLOCK] * BLOCKS)).placed)
    client.unmap_region(source)
    return keys, data


def submit_half_loaded(
    client: ServerClient, keys: list[str], data: torch.Tensor
) -> tuple[int, SharedRegion]:
    """A load the gated server has written half of, and waits in."""
    target = client.map_region(BLOCKS * BLOCK)
    target.tensor.fill_(0xAA)
    job = client.submit_load(keys, target, [i * BLOCK for i in range(BLOCKS)], [BLOCK] * BLOCKS)
    half = BLOCKS // 2 * BLOCK
    wait_for(lambda: torch.equal(target.tensor[:half], data[:half]), "the first half's bytes")
    return job, target


def test_ring_counts_and_keeps_the_last_ids() -> None:
    ring = CompletionRing(memoryview(bytearray(8 * 4)))  # 3 slots
    assert ring.count == 0 and ring.recent(0) == []
    for reply_id in (7, 8, 9, 10):
        ring.record(reply_id)
    assert ring.count == 4
    assert ring.recent(0) == [8, 9, 10]  # the oldest was overwritten
    assert ring.recent(3) == [10]
    with pytest.raises(InvalidValueError, match="multiple of 8 bytes"):
        CompletionRing(memoryview(bytearray(12)))


def test_a_job_is_counted_only_after_all_its_bytes_are_written(
    gated: tuple[ServerProcess, Path],
) -> None:
    server, gate = gated
    with ServerClient(server.socket_path) as client:
        keys, data = stored_blocks(client)
        wait_for(lambda: client.poll() == [] and client.ring is not None, "the ring to be used")
        ring = client.ring
        assert ring is not None
        job, target = submit_half_loaded(client, keys, data)
        assert job not in ring.recent(0)
        assert client.poll() == []
        gate.touch()
        # The moment the ring names the job, every byte of it is there already.
        wait_for(lambda: job in ring.recent(0), "the ring to name the job")
        assert torch.equal(target.tensor, data)
        finished: list[object] = []
        wait_for(lambda: finished.extend(client.poll()) or finished, "the job's result")
        (result,) = finished
        assert result.job_id == job and all(f is not None and f.copied for f in result.found)


def test_a_killed_server_counts_nothing_it_did_not_finish(
    gated: tuple[ServerProcess, Path],
) -> None:
    server, _ = gated
    client = ServerClient(server.socket_path)
    try:
        keys, data = stored_blocks(client)
        wait_for(lambda: client.poll() == [] and client.ring is not None, "the ring to be used")
        ring = client.ring
        assert ring is not None
        job, target = submit_half_loaded(client, keys, data)
        counted = ring.count
        server.kill()
        finished: list[object] = []
        wait_for(lambda: finished.extend(client.poll()) or finished, "the job to end as misses")
        (result,) = finished
        assert result.job_id == job and result.error is not None
        assert result.found == [None] * BLOCKS
        assert ring.count == counted and job not in ring.recent(0)
        assert torch.equal(
            target.tensor[BLOCK * BLOCKS // 2 :],
            torch.full_like(target.tensor[BLOCK * BLOCKS // 2 :], 0xAA),
        )
    finally:
        client.close()


def test_a_quiet_poll_makes_no_system_call(
    gated: tuple[ServerProcess, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, gate = gated
    with ServerClient(server.socket_path) as client:
        keys, data = stored_blocks(client)
        wait_for(lambda: client.poll() == [] and client.ring is not None, "the ring to be used")
        job, _ = submit_half_loaded(client, keys, data)
        client.poll()  # reads what came before the job waited
        monkeypatch.setattr(client_module, "LIVENESS_S", 3600.0)
        reads: list[int] = []
        real = client._receive

        def counted(fd: int) -> bytes | None:
            reads.append(fd)
            return real(fd)

        monkeypatch.setattr(client, "_receive", counted)
        for _ in range(100):
            assert client.poll() == []
        assert reads == []
        gate.touch()
        finished: list[object] = []
        wait_for(lambda: finished.extend(client.poll()) or finished, "the job's result")
        assert [r.job_id for r in finished] == [job]  # type: ignore[attr-defined]
        assert reads  # the ring moved: the reply was read from the socket
