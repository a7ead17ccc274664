"""The vLLM secondary tier through ``lmtier serve``, against vLLM's real TieringOffloadingManager.

The first engine starts the server (as a user's engine would), later engines find it; the
server is a real child process, killed and restarted where the test says so.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_helpers import (
    Engine,
    as_bytes,
    engine_factory,
    fill,
    need_engine,
    payload,
    secondary_extra,
    wait_for,
)

need_engine("vllm.v1.kv_offload.tiering.spec")

from vllm.v1.kv_offload.base import LookupResult  # noqa: E402

from lmtier.errors import ConfigError  # noqa: E402
from lmtier.integrations.vllm_server import LmtierServerTier  # noqa: E402
from lmtier.server.launch import ensure_server, server_pid  # noqa: E402

ROW = 4096


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A socket path and a disk config for the server the first engine starts; the server
    is stopped at the end."""
    config = tmp_path / "lmtier.yaml"
    tiers = [{"name": "disk", "kind": "disk", "path": str(tmp_path / "disk"), "max_size_gb": 0.01}]
    config.write_text(json.dumps({"tiers": tiers}))
    socket_path = tmp_path / "run" / "s.sock"
    yield socket_path, config
    pid = server_pid(socket_path)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not socket_path.exists(), timeout=60)


@pytest.fixture
def engines() -> Iterator[Any]:
    yield from engine_factory(lambda tier, rows: secondary_extra(tier, rows, ROW))


def load_back(engine: Engine, key: bytes, req: Any) -> tuple[list[Any], bytes | None]:
    """Look ``key`` up until settled (a promotion runs on a hit); the answers and the bytes."""
    seen = engine.lookup_until_settled(key, req)
    if seen[-1] is not LookupResult.HIT:
        return seen, None
    (data,) = engine.read([key], req)
    return seen, as_bytes(data)


def test_the_first_engine_starts_a_server_and_blocks_round_trip(
    served: tuple[Path, Path], engines: Any
) -> None:
    socket_path, config = served
    engine = engines({"server": str(socket_path), "config_path": str(config)})
    assert isinstance(engine.tier, LmtierServerTier)
    assert server_pid(socket_path) is not None
    first = fill(engine, "first", 4, engine.ctx("r1"))
    for key in first:
        assert engine.lookup(key, engine.ctx("r1b")) is LookupResult.HIT
    fill(engine, "second", 4, engine.ctx("r2"))  # evicts "first" from vLLM's rows
    for key in first:
        seen, data = load_back(engine, key, engine.ctx(f"r3-{key.hex()}"))
        assert seen[0] is LookupResult.HIT_PENDING and seen[-1] is LookupResult.HIT
        assert data == as_bytes(payload(key, engine.row_bytes))
    assert engine.tier.stats()["stored"] == 8 and engine.tier.stats()["loaded"] == 4


def test_two_engines_on_one_server_hit_each_others_blocks(
    served: tuple[Path, Path], engines: Any
) -> None:
    socket_path, config = served
    writer = engines({"server": str(socket_path), "config_path": str(config)})
    reader = engines({"server": str(socket_path), "config_path": str(config)})
    blocks = fill(writer, "shared", 3, writer.ctx("w"))
    for key in blocks:
        seen, data = load_back(reader, key, reader.ctx(f"read-{key.hex()}"))
        assert seen[0] is LookupResult.RETRY  # asked of the server, not known here
        assert seen[-1] is LookupResult.HIT
        assert data == as_bytes(payload(key, reader.row_bytes))
    assert reader.tier.stats()["shared_hits"] == 3


def test_engines_of_different_models_never_hit(served: tuple[Path, Path], engines: Any) -> None:
    socket_path, config = served
    llama = engines({"server": str(socket_path), "config_path": str(config)})
    other = engines({"server": str(socket_path)}, model="other-model")
    (key,) = fill(llama, "model", 1, llama.ctx("w"))
    assert other.lookup_until_settled(key, other.ctx("r"))[-1] is LookupResult.MISS


def test_a_killed_server_gives_misses_and_the_engine_reconnects(
    served: tuple[Path, Path], engines: Any
) -> None:
    socket_path, config = served
    engine = engines({"server": str(socket_path), "config_path": str(config)})
    held = fill(engine, "before", 4, engine.ctx("w"))
    pid = server_pid(socket_path)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # vLLM's rows no longer hold "before": each hit must come back from the (dead) server.
    fill(engine, "evict", 4, engine.ctx("e"))
    assert engine.tier.stats()["store_failed"] == 4
    seen, data = load_back(engine, held[0], engine.ctx("dead"))
    assert data is None and seen[-1] is LookupResult.MISS, seen
    assert engine.tier.stats()["load_failed"] == 1
    ensure_server(socket_path, config)  # the next engine on the node starts it again
    # The disk tier kept its files: the block stored before the kill is found again.
    seen, data = load_back(engine, held[1], engine.ctx("back"))
    assert data == as_bytes(payload(held[1], engine.row_bytes)), seen


def test_in_process_options_with_a_server_are_refused(
    served: tuple[Path, Path], engines: Any
) -> None:
    socket_path, _ = served
    with pytest.raises(ConfigError, match="batch_blocks"):
        engines({"server": str(socket_path), "batch_blocks": 8})


def test_the_activity_line_counts_the_tiers_jobs_and_the_servers_tiers(
    served: tuple[Path, Path], engines: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lmtier.integrations.activity")
    socket_path, config = served
    engine = engines({"server": str(socket_path), "config_path": str(config)})
    fill(engine, "activity", 2, engine.ctx("w"))
    engine.close()  # the close writes the last line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    # The server's tiers, as its stats give them: two 4 KiB blocks on its disk tier.
    assert lines[0].startswith(
        "lmtier vLLM tier 'LmtierSecondaryTier': 0 lookups, no hits; 2 blocks stored, 0 loaded; "
        "disk 8.0 KiB of "
    ), lines[0]
