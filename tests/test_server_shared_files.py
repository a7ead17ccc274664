"""An engine's own shared-memory file as a server region, and the batched ``Holds`` lookup."""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmtier.errors import InvalidValueError, StorageError
from lmtier.server import ServerClient
from lmtier.server.regions import SharedRegion, map_region

from server_helpers import (
    BLOCK,
    ServerProcess,
    blocks_for,
    serve_disk_store,
    store_blocks,
)

ROWS = 8
NOBODY = 65534


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve_disk_store(tmp_path_factory)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[ServerClient]:
    with ServerClient(server.socket_path) as made:
        yield made


@pytest.fixture
def engine_file() -> Iterator[int]:
    """A shared-memory file as an engine makes one (created 0600, then unlinked, as vLLM's
    CPU tier does once its workers mapped it): only its descriptor is left."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = Path(folder) / f"lmtier-test-engine-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    path.unlink()
    os.ftruncate(fd, ROWS * BLOCK)
    yield fd
    os.close(fd)


def test_blocks_move_in_place_between_the_engines_file_and_the_store(
    client: ServerClient, engine_file: int
) -> None:
    engine_view = torch.frombuffer(mmap.mmap(engine_file, ROWS * BLOCK), dtype=torch.uint8)
    data = blocks_for("engine-file", ROWS).reshape(-1).view(torch.uint8)
    engine_view.copy_(data)
    region = client.share_file(engine_file, ROWS * BLOCK)
    keys = [f"engine-file/{i}" for i in range(ROWS)]
    offsets = [i * BLOCK for i in range(ROWS)]
    stored = client.wait(client.submit_store(keys, region, offsets, [BLOCK] * ROWS))
    assert stored.error is None and all(stored.placed)

    engine_view.fill_(0)  # the engine reuses its rows; the store has the blocks
    reversed_offsets = offsets[::-1]
    loaded = client.wait(client.submit_load(keys, region, reversed_offsets, [BLOCK] * ROWS))
    assert loaded.error is None and all(f is not None and f.copied for f in loaded.found)
    # The engine's own mapping of the file sees each block at the row the load named.
    for i, offset in enumerate(reversed_offsets):
        assert torch.equal(engine_view[offset : offset + BLOCK], data[i * BLOCK : (i + 1) * BLOCK])


def test_holds_names_the_tier_of_each_key(client: ServerClient) -> None:
    store_blocks(client, ["holds/0", "holds/1"], blocks_for("holds", 2))
    result = client.wait(client.submit_holds(["holds/0", "holds/none", "holds/1"]))
    assert result.error is None
    assert result.tiers == ["disk", None, "disk"]


def test_holds_of_a_server_that_is_gone_reports_none_held(tmp_path: Path) -> None:
    with ServerClient(tmp_path / "nobody-here.sock", timeout=5) as client:
        result = client.wait(client.submit_holds(["a", "b"]))
    assert result.tiers == [None, None] and result.error is not None


def test_a_file_too_small_or_not_a_file_is_not_adopted(engine_file: int) -> None:
    with pytest.raises(InvalidValueError, match="needs a file of that size"):
        SharedRegion.adopt(engine_file, ROWS * BLOCK + 1)
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(InvalidValueError, match="not a file"):
            SharedRegion.adopt(read_end, 4096)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_the_server_takes_an_unsealed_file_only_when_asked(engine_file: int) -> None:
    with pytest.raises(StorageError, match="sealed"):
        map_region(os.dup(engine_file), ROWS * BLOCK)
    assert map_region(os.dup(engine_file), ROWS * BLOCK, sealed=False).numel() == ROWS * BLOCK


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_the_server_refuses_another_users_unsealed_file(engine_file: int) -> None:
    os.fchown(engine_file, NOBODY, NOBODY)
    with pytest.raises(StorageError, match="must belong to the server's user"):
        map_region(os.dup(engine_file), ROWS * BLOCK, sealed=False)
