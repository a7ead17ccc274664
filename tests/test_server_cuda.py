"""The server path on a GPU: blocks go device -> pinned shared memory -> ``lmtier serve`` and
back, the shared region registered with CUDA as pinned memory (as an engine's CPU tier is)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lmtier.server import ServerClient, SharedRegion

from server_helpers import BLOCK, ServerProcess, serve_disk_store

pytestmark = pytest.mark.cuda

BLOCKS = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve_disk_store(tmp_path_factory)


def pinned(region: SharedRegion) -> None:
    """Register the region's pages with CUDA (page-locked), as an engine pins its CPU tier."""
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(region.tensor.data_ptr(), region.size, 0)
    assert int(error) == 0, f"cudaHostRegister failed: {error}"


def test_blocks_round_trip_between_the_device_and_the_server_through_pinned_regions(
    server: ServerProcess,
) -> None:
    device = torch.device("cuda")
    blocks = torch.randn(BLOCKS, BLOCK // 2, device=device).to(torch.float16)
    keys = [f"gpu/{i}" for i in range(BLOCKS)]
    offsets = [i * BLOCK for i in range(BLOCKS)]
    with ServerClient(server.socket_path) as client:
        source = client.map_region(BLOCKS * BLOCK)
        target = client.map_region(BLOCKS * BLOCK)
        pinned(source)
        pinned(target)
        staged = source.tensor.view(torch.float16).view(BLOCKS, BLOCK // 2)
        staged.copy_(blocks, non_blocking=True)  # device -> pinned shared memory
        torch.cuda.synchronize()
        stored = client.wait(client.submit_store(keys, source, offsets, [BLOCK] * BLOCKS))
        assert stored.error is None and all(stored.placed)

        loaded = client.wait(client.submit_load(keys, target, offsets, [BLOCK] * BLOCKS))
        assert all(found is not None and found.copied for found in loaded.found)
        back = (
            target.tensor.view(torch.float16).view(BLOCKS, BLOCK // 2).to(device, non_blocking=True)
        )  # pinned shared memory -> device
        torch.cuda.synchronize()
        assert torch.equal(back.view(torch.int16), blocks.view(torch.int16))
        cudart = torch.cuda.cudart()
        for region in (source, target):
            cudart.cudaHostUnregister(region.tensor.data_ptr())
