"""The SGLang backend with ``"server"`` in its extra_config: pages kept by a real ``lmtier
serve`` child process, moved through shared staging regions.

Runs where SGLang is importable, as tests/integrations/test_sglang_backend.py does.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sglang_helpers import (
    DTYPE,
    PAGE_BYTES,
    PAGE_NUMEL,
    PAGE_SIZE,
    build,
    from_threads,
    host_pool,
    indices_of,
    inner,
    page_for,
    storage_config,
)

from lmtier import ConfigError
from lmtier.integrations import sglang_server
from lmtier.integrations.sglang_server import ServerPages

from server_helpers import ServerProcess, wait_for
from server_helpers import disk_config as server_config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("sglang-server")
    process = ServerProcess(server_config(folder), folder / "run" / "lmtier.sock").start()
    yield process
    assert process.stop() == 0, "".join(process.log)


def on_server(tmp_path: Path, server: ServerProcess, pool: Any = None, **config: Any) -> Any:
    """A backend (one SGLang process) whose pages the server keeps: its extra_config has the
    one ``server`` line more than the in-process tests' (the inline store config is unused)."""
    return build(storage_config(tmp_path, server=str(server.socket_path), **config), pool)


def pages_of(backend: Any) -> ServerPages:
    pages = inner(backend)._pages
    assert isinstance(pages, ServerPages)
    return pages


def zeros(count: int) -> list[torch.Tensor]:
    return [torch.zeros(PAGE_NUMEL, dtype=DTYPE) for _ in range(count)]


def flat_page(pool: Any, page: int) -> torch.Tensor:
    return pool.get_data_page(page * PAGE_SIZE, flat=True)


# ---------------------------------------------------------------------------- one process
def test_no_store_runs_in_the_sglang_process(tmp_path: Path, server: ServerProcess) -> None:
    backend = on_server(tmp_path, server, model_name="org/none-here")
    try:
        assert inner(backend)._store is None
        assert backend.set("k", page_for("k"))
        stats = inner(backend).lmtier_stats()  # the server's store
        assert stats["tiers"]["disk"]["entries"] >= 1
        assert not (tmp_path / "l3").exists()  # the inline config's disk folder: unused
    finally:
        backend.close()
    backend.close()
    # closed: misses and failures, nothing raised
    assert backend.exists("k") is False and backend.batch_exists(["k"]) == 0
    assert backend.get("k", torch.zeros(PAGE_NUMEL, dtype=DTYPE)) is None
    assert backend.set("k2", page_for("k2")) is False
    assert backend.clear() is False


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_v1_pages_go_through_the_server_bit_exact(
    tmp_path: Path, server: ServerProcess, layout: str
) -> None:
    pool = host_pool(layout)
    backend = on_server(tmp_path, server, pool, model_name=f"org/v1-{layout}", interface_v1=1)
    try:
        keys = [f"v{i}" for i in range(6)]
        originals = [flat_page(pool, p).clone() for p in range(6)]
        assert backend.batch_set_v1(keys, indices_of(list(range(6)))) == [True] * 6
        pool.kv_buffer.zero_()
        targets = [10, 9, 8, 12, 14, 15]  # other pages of the pool, in another order
        assert backend.batch_get_v1([*keys, "missing"], indices_of([*targets, 0])) == [
            *[True] * 6,
            False,
        ]
        for original, page in zip(originals, targets, strict=True):
            assert torch.equal(flat_page(pool, page), original)
        untouched = [p for p in range(16) if p not in targets]
        assert not any(flat_page(pool, p).any() for p in untouched)
        # the flat path reads what the zero-copy path stored
        flat = pool.get_dummy_flat_data_page()
        assert backend.get("v2", flat) is flat and torch.equal(flat, originals[2])
    finally:
        backend.close()


def test_flat_pages_go_through_the_server_bit_exact(tmp_path: Path, server: ServerProcess) -> None:
    pool = host_pool("page_first")
    backend = on_server(tmp_path, server, pool, model_name="org/flat")
    try:
        keys = [f"f{i}" for i in range(10)]
        assert backend.batch_set(keys[:5] + keys[6:], [page_for(k) for k in keys if k != "f5"])
        assert backend.exists("f0") and not backend.exists("f5")
        assert backend.batch_exists(keys) == 5  # stops at the first miss, f5
        targets = zeros(len(keys))
        got = backend.batch_get(keys, targets)
        for key, target, result in zip(keys, targets, got, strict=True):
            if key == "f5":
                assert result is None and not target.any()
            else:
                assert result is target and torch.equal(target, page_for(key)), key
        copy = backend.get("f1")  # no target: a page of its own
        assert torch.equal(copy.reshape(-1), page_for("f1"))
    finally:
        backend.close()


def test_a_batch_larger_than_the_staging_region(
    tmp_path: Path, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sglang_server, "STAGING_PAGES", 4)
    backend = on_server(tmp_path, server, model_name="org/large-batch")
    try:
        staging = pages_of(backend).staging
        assert backend.batch_set(["s0"], [page_for("s0")])
        assert staging.sizes() == [4 * PAGE_BYTES]  # the first region: STAGING_PAGES pages
        keys = [f"s{i}" for i in range(1, 41)]
        assert backend.batch_set(keys, [page_for(k) for k in keys])
        assert staging.sizes() == [40 * PAGE_BYTES]  # replaced by one that fits the batch
        targets = zeros(len(keys))
        assert all(got is not None for got in backend.batch_get(keys, targets))
        assert all(torch.equal(t, page_for(k)) for k, t in zip(keys, targets, strict=True))
        assert staging.sizes() == [40 * PAGE_BYTES]  # reused, not made again
    finally:
        backend.close()


# ---------------------------------------------------------------------------- two processes
def test_a_page_one_process_stored_is_found_by_another(
    tmp_path: Path, server: ServerProcess
) -> None:
    keys = [f"shared{i}" for i in range(12)]
    writer = on_server(tmp_path / "a", server, host_pool("page_first"), model_name="org/shared")
    reader = on_server(tmp_path / "b", server, host_pool("page_first"), model_name="org/shared")
    try:
        assert reader.batch_exists(keys) == 0
        assert writer.batch_set(keys, [page_for(k) for k in keys])
        assert reader.batch_exists([*keys, "nobody", keys[0]]) == len(keys)
        targets = zeros(len(keys))
        assert all(got is not None for got in reader.batch_get(keys, targets))
        assert all(torch.equal(t, page_for(k)) for k, t in zip(keys, targets, strict=True))
        # a page already on the server is not stored again: its first bytes stay
        assert reader.batch_set(keys[:1], [page_for(keys[0], 1)])
        target = zeros(1)[0]
        assert writer.get(keys[0], target) is target and torch.equal(target, page_for(keys[0]))
    finally:
        writer.close()
        reader.close()


def test_other_models_and_shards_never_hit(tmp_path: Path, server: ServerProcess) -> None:
    keys = [f"iso{i}" for i in range(8)]
    a = on_server(tmp_path / "a", server, model_name="org/iso-a")
    b = on_server(tmp_path / "b", server, model_name="org/iso-b")
    other_shard = on_server(tmp_path / "c", server, model_name="org/iso-a", tp_rank=1, tp_size=2)
    try:
        assert a.batch_set(keys, [page_for(k) for k in keys])
        for other in (b, other_shard):
            assert other.batch_exists(keys) == 0
            assert not other.exists(keys[0])
            targets = zeros(3)
            assert other.batch_get(keys[:3], targets) == [None] * 3
            assert not any(t.any() for t in targets)
        assert b.batch_set(keys[:2], [page_for(k, 1) for k in keys[:2]])
        assert b.clear()  # model b's keys only
        assert b.batch_exists(keys) == 0
        assert a.batch_exists(keys) == len(keys)
        targets = zeros(2)
        got = a.batch_get(keys[:2], targets)
        assert all(result is target for result, target in zip(got, targets, strict=True))
        assert all(torch.equal(t, page_for(k)) for k, t in zip(keys[:2], targets, strict=True))
        assert a.clear()
        assert a.batch_exists(keys) == 0
    finally:
        for backend in (a, b, other_shard):
            backend.close()


def test_prefetch_and_backup_threads_share_the_server(
    tmp_path: Path, server: ServerProcess
) -> None:
    backend = on_server(tmp_path, server, model_name="org/threads")
    try:
        from_threads(backend, [f"t{i}" for i in range(48)], threads=4, rounds=20)
        # each caller had a region of its own, and gave it back
        assert 1 <= len(pages_of(backend).staging.sizes()) <= 4
    finally:
        backend.close()


# ---------------------------------------------------------------------------- a server that dies
def test_a_killed_server_misses_and_a_restarted_one_serves_again(tmp_path: Path) -> None:
    process = ServerProcess(server_config(tmp_path), tmp_path / "run" / "lmtier.sock").start()
    pool = host_pool("page_first")
    backend = build(storage_config(tmp_path, server=str(process.socket_path), interface_v1=1), pool)
    try:
        keys = [f"d{i}" for i in range(4)]
        originals = [flat_page(pool, p).clone() for p in range(4)]
        assert backend.batch_set_v1(keys, indices_of([0, 1, 2, 3])) == [True] * 4
        assert pages_of(backend).staging.sizes() != []
        process.kill()
        pool.kv_buffer.fill_(7)  # what a get must leave alone
        before = pool.kv_buffer.clone()
        assert backend.batch_exists(keys) == 0
        assert backend.exists(keys[0]) is False
        assert backend.batch_get_v1(keys, indices_of([4, 5, 6, 7])) == [False] * 4
        assert backend.batch_get(keys, zeros(4)) == [None] * 4
        assert torch.equal(pool.kv_buffer, before)
        assert pages_of(backend).staging.sizes() == []  # a failed job's region is not reused
        assert backend.batch_set_v1(["late"], indices_of([8])) == [False]
        assert backend.batch_set(["late"], [page_for("late")]) is False
        assert backend.clear() is False  # it cannot reach the server: nothing was cleared

        process.start()  # the same socket and disk folder: the pages are still there
        wait_for(lambda: backend.batch_exists(keys) == len(keys), "a restarted server's hits")
        assert backend.batch_get_v1(keys, indices_of([4, 5, 6, 7])) == [True] * 4
        for original, page in zip(originals, [4, 5, 6, 7], strict=True):
            assert torch.equal(flat_page(pool, page), original)
        assert backend.batch_set(["late"], [page_for("late")])
        target = zeros(1)[0]
        assert backend.get("late", target) is target and torch.equal(target, page_for("late"))
    finally:
        backend.close()
        process.kill()


# ---------------------------------------------------------------------------- config, reports
def test_a_bad_server_value_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'server'"):
        build(storage_config(tmp_path, server=3))
    with pytest.raises(ConfigError, match="report_interval_s"):
        build(storage_config(tmp_path, server=True, report_interval_s=-1))


def test_the_activity_line_counts_what_went_through_the_server(
    tmp_path: Path, server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lmtier.integrations.activity")
    backend = on_server(tmp_path, server, model_name="org/activity")
    keys = [f"a{i}" for i in range(4)]
    assert backend.batch_set(keys, [page_for(k) for k in keys])
    assert backend.batch_exists([*keys, "missing", "a0"]) == 4
    pages = backend.batch_get([*keys[:2], "missing"], zeros(3))
    assert [page is not None for page in pages] == [True, True, False]
    backend.close()  # the close writes the last line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "lmtier HiCache storage tp0: 6 lookups, 4 hits (66.7%); 4 blocks stored, "
        "2 loaded (1 failed); disk "
    ), lines[0]
    assert lines[0].endswith(" of 1.0 GiB"), lines[0]


def test_the_first_process_given_a_config_path_starts_the_server(tmp_path: Path) -> None:
    from lmtier.server.launch import server_pid

    socket_path = tmp_path / "run" / "s.sock"
    config = str(server_config(tmp_path))
    first = build(storage_config(tmp_path, server=str(socket_path), config_path=config))
    try:
        pid = server_pid(socket_path)
        assert pid is not None  # started by the first backend, running beside it
        assert first.set("started", page_for("started"))
        second = build(storage_config(tmp_path, server=str(socket_path), config_path=config))
        try:
            assert server_pid(socket_path) == pid  # found, not started again
            assert second.exists("started")
        finally:
            second.close()
    finally:
        first.close()
        pid = server_pid(socket_path)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not socket_path.exists(), "the server to stop")
