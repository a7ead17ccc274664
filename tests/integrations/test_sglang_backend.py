"""lmtier as SGLang's HiCache L3 storage backend, built through SGLang's own factory.

Runs where SGLang is importable (scripts/install_engines.sh sglang makes such a venv):

    .venvs/sglang/bin/python -m pytest tests/integrations/test_sglang_backend.py

Skipped elsewhere, unless REQUIRE_ENGINE_TESTS=1, where a missing SGLang fails the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sglang_helpers import (
    DTYPE,
    PAGE_NUMEL,
    PAGE_SIZE,
    HiCacheStorage,
    build,
    disk_config,
    from_threads,
    host_pool,
    indices_of,
    inner,
    lmtier_config,
    page_for,
    storage_config,
)

from lmtier import ConfigError
from lmtier.integrations.sglang import LmtierHiCacheStorage


@pytest.fixture
def backend(tmp_path: Path) -> Any:
    made = build(storage_config(tmp_path))
    yield made
    made.close()


# ---------------------------------------------------------------------------- construction
def test_sglang_factory_builds_the_backend(tmp_path: Path) -> None:
    backend = build(storage_config(tmp_path))
    try:
        assert isinstance(backend, HiCacheStorage)
        assert isinstance(inner(backend), LmtierHiCacheStorage)
        # keys are suffixed as SGLang's HiCacheFile does: model (with / as -), tp rank, tp size
        assert inner(backend).config_suffix == "_org-model-a_0_1"
    finally:
        backend.close()


def test_mla_keys_are_shared_by_tp_ranks(tmp_path: Path) -> None:
    backend = build(storage_config(tmp_path, tp_rank=1, tp_size=2, is_mla_model=True))
    try:
        assert inner(backend).config_suffix == "_org-model-a"
        assert inner(backend).tp_config_suffix == "_org-model-a_1_2"
    finally:
        backend.close()


def test_config_from_a_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "lmtier.yaml"
    path.write_text(
        f"tiers:\n  - {{name: disk, kind: disk, path: {tmp_path / 'yaml-l3'}, max_size_mb: 1}}\n"
    )
    backend = build(storage_config(tmp_path, config_path=str(path)))
    try:
        assert backend.set("k", page_for("k"))
        store = inner(backend)._store
        assert store.contains("k" + inner(backend).config_suffix) == "disk"
        assert [t.evictor for t in store.store.config.tiers] == ["prefix"]  # engines' default
        assert (tmp_path / "yaml-l3" / "rank-tp0-pp0-dp0-cp0").is_dir()  # one folder per rank
    finally:
        backend.close()


def test_bad_configs_raise_config_errors(tmp_path: Path) -> None:
    both = storage_config(tmp_path, config_path=str(tmp_path / "x.yaml"))
    both.extra_config["config"] = lmtier_config(tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        build(both)
    bad = storage_config(tmp_path, config={"tiers": [{"name": "m", "kind": "memory"}]})
    with pytest.raises(ConfigError, match="max_size"):
        build(bad)


# ---------------------------------------------------------------------------- generic path
def test_set_and_prefix_exists(backend: Any) -> None:
    keys = [f"h{i}" for i in range(10)]
    assert backend.batch_set(keys[:5] + keys[6:], [page_for(k) for k in keys[:5] + keys[6:]])
    assert backend.exists("h0") and not backend.exists("h5")
    assert backend.batch_exists(keys) == 5  # stops at the first miss, h5
    assert backend.batch_exists(keys[:5]) == 5
    assert backend.batch_exists(["h5", *keys[:5]]) == 0
    assert backend.batch_exists([]) == 0
    assert backend.set("h5", page_for("h5"))
    assert backend.batch_exists(keys) == 10


def test_get_is_bit_exact_from_every_tier(tmp_path: Path) -> None:
    pool = host_pool("page_first")
    backend = build(storage_config(tmp_path), pool)
    try:
        keys = [f"p{i}" for i in range(40)]  # 40 pages, 8 fit in memory: the rest spill to disk
        assert backend.batch_set(keys, [page_for(k) for k in keys])
        store = inner(backend)._store
        where = {k: store.contains(k + inner(backend).config_suffix) for k in keys}
        assert set(where.values()) == {"cpu", "disk"}, where
        targets = [pool.get_dummy_flat_data_page() for _ in keys]
        got = backend.batch_get(keys, targets)
        for key, target, result in zip(keys, targets, got, strict=True):
            assert result is target
            assert torch.equal(target, page_for(key)), f"{key} from {where[key]}"
        single = pool.get_dummy_flat_data_page()
        assert backend.get("p0", single) is single and torch.equal(single, page_for("p0"))
        assert backend.get("missing", pool.get_dummy_flat_data_page()) is None
        assert store.audit() == []
    finally:
        backend.close()


def test_get_without_a_target_returns_a_copy(backend: Any) -> None:
    assert backend.set("a", page_for("a"))
    value = backend.get("a")
    assert torch.equal(value, page_for("a"))
    both = backend.batch_get(["a", "b"])
    assert torch.equal(both[0], page_for("a")) and both[1] is None


# ---------------------------------------------------------------------------- zero-copy path
@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_v1_moves_pages_between_the_host_pool_and_lmtier(tmp_path: Path, layout: str) -> None:
    pool = host_pool(layout)
    backend = build(storage_config(tmp_path, interface_v1=1), pool)
    try:
        keys = [f"v{i}" for i in range(6)]
        originals = [pool.get_data_page(p * PAGE_SIZE, flat=True).clone() for p in range(6)]
        assert backend.batch_set_v1(keys, indices_of(list(range(6)))) == [True] * 6
        pool.kv_buffer.zero_()
        # read back into other pages of the pool, in another order
        targets = [10, 9, 8, 12, 14, 15]
        assert backend.batch_get_v1(keys, indices_of(targets)) == [True] * 6
        for original, page in zip(originals, targets, strict=True):
            assert torch.equal(pool.get_data_page(page * PAGE_SIZE, flat=True), original)
        untouched = [p for p in range(16) if p not in targets]
        for page in untouched:
            assert not pool.get_data_page(page * PAGE_SIZE, flat=True).any()
        # the generic path reads what the zero-copy path wrote, and the other way round
        flat = pool.get_dummy_flat_data_page()
        assert backend.get("v2", flat) is flat and torch.equal(flat, originals[2])
        assert backend.set("g", page_for("g"))
        assert backend.batch_get_v1(["g", "nope"], indices_of([0, 1])) == [True, False]
        assert torch.equal(pool.get_data_page(0, flat=True), page_for("g"))
        # a mismatched index count is refused, not misread
        assert backend.batch_get_v1(keys, indices_of([0])) == [False] * 6
    finally:
        backend.close()


def test_a_page_stored_in_another_layout_is_a_miss(tmp_path: Path) -> None:
    config = disk_config(tmp_path)
    first = build(storage_config(tmp_path, config=config), host_pool("page_first"))
    assert first.batch_set_v1(["k"], indices_of([0])) == [True]
    first.close()
    second = build(storage_config(tmp_path, config=config), host_pool("layer_first"))
    try:
        assert second.exists("k")  # the key is there, but its page shape is another layout's
        assert second.batch_get_v1(["k"], indices_of([3])) == [False]
    finally:
        second.close()


# ---------------------------------------------------------------------------- isolation
def test_another_model_never_hits_and_a_restart_keeps_pages(tmp_path: Path) -> None:
    keys = [f"m{i}" for i in range(20)]
    config = disk_config(tmp_path)
    # rank_dirs off: every backend below opens the same folder
    a = build(storage_config(tmp_path, model_name="org/model-a", config=config, rank_dirs=False))
    assert a.batch_set(keys, [page_for(k) for k in keys])
    a.close()
    b = build(storage_config(tmp_path, model_name="org/model-b", config=config, rank_dirs=False))
    try:
        assert b.batch_exists(keys) == 0
        assert b.batch_get(keys[:3], [torch.zeros(PAGE_NUMEL, dtype=DTYPE)] * 3) == [None] * 3
        assert b.batch_set(keys[:2], [page_for(k, 1) for k in keys[:2]])
        assert b.clear()  # model b's entries only
        assert b.batch_exists(keys) == 0
    finally:
        b.close()
    other_rank = build(
        storage_config(tmp_path, tp_rank=1, tp_size=2, rank_dirs=False, config=config)
    )
    try:
        assert other_rank.batch_exists(keys) == 0  # the same model's other TP shard
    finally:
        other_rank.close()
    again = build(
        storage_config(tmp_path, model_name="org/model-a", config=config, rank_dirs=False)
    )
    try:
        # reopened from disk: model a's pages are all there, bit-exact, untouched by b's clear
        assert again.batch_exists(keys) == len(keys)
        targets = [torch.zeros(PAGE_NUMEL, dtype=DTYPE) for _ in keys]
        again.batch_get(keys, targets)
        assert all(torch.equal(t, page_for(k)) for k, t in zip(keys, targets, strict=True))
    finally:
        again.close()


# ---------------------------------------------------------------------------- shared redis tier
def redis_config(url: str) -> dict[str, Any]:
    """A redis tier alone: every page a backend stores is on the shared server."""
    return {"tiers": [{"name": "remote", "kind": "redis", "url": url, "max_size_mb": 4}]}


def round_trips(backend: Any) -> int:
    return int(inner(backend).lmtier_stats()["tiers"]["remote"]["round_trips"])


def test_pages_another_instance_stored_on_redis_are_counted_and_cleared(
    tmp_path: Path, redis_server: Any
) -> None:
    keys = [f"r{i}" for i in range(8)]
    config = redis_config(redis_server.url)

    def instance() -> Any:
        return build(storage_config(tmp_path, config=config))

    writer = instance()
    try:
        assert writer.batch_set(keys, [page_for(k) for k in keys])
    finally:
        writer.close()
    reader = instance()
    try:
        before = round_trips(reader)
        # SGLang's prefetch counts its hits here: the shared pages must count, asked for in
        # one round trip (not one per page); a page nobody stored ends the count.
        assert reader.batch_exists([*keys, "nobody", keys[0]]) == len(keys)
        assert round_trips(reader) - before == 1
        assert reader.batch_exists(keys) == len(keys)  # now indexed: no round trip at all
        assert round_trips(reader) - before == 1
        targets = [torch.zeros(PAGE_NUMEL, dtype=DTYPE) for _ in keys]
        reader.batch_get(keys, targets)
        assert all(torch.equal(t, page_for(k)) for k, t in zip(keys, targets, strict=True))
    finally:
        reader.close()
    cleaner = instance()  # indexes none of the pages
    try:
        assert cleaner.clear()
    finally:
        cleaner.close()
    after = instance()
    try:
        assert after.batch_exists(keys) == 0
        assert after.batch_get(keys, [torch.zeros(PAGE_NUMEL, dtype=DTYPE)] * 8) == [None] * 8
    finally:
        after.close()


# ---------------------------------------------------------------------------- threads
def test_prefetch_and_backup_threads_share_the_backend(backend: Any) -> None:
    from_threads(backend, [f"c{i}" for i in range(48)], threads=8, rounds=40)
    assert inner(backend)._store.audit() == []


# ---------------------------------------------------------------------------- clear, close
def test_clear_removes_every_entry(backend: Any) -> None:
    keys = [f"x{i}" for i in range(30)]  # in memory and on disk
    assert backend.batch_set(keys, [page_for(k) for k in keys])
    assert backend.clear() is True
    assert backend.batch_exists(keys) == 0
    assert inner(backend).lmtier_stats()["entries"] == 0
    assert backend.set("x0", page_for("x0", 2))
    target = torch.zeros(PAGE_NUMEL, dtype=DTYPE)
    assert backend.get("x0", target) is target and torch.equal(target, page_for("x0", 2))


def test_close_stops_the_thread_and_later_calls_miss(tmp_path: Path) -> None:
    backend = build(storage_config(tmp_path))
    thread = inner(backend)._store._runner.thread
    assert backend.set("a", page_for("a"))
    backend.close()
    backend.close()
    assert not thread.is_alive()
    assert backend.exists("a") is False
    assert backend.batch_exists(["a"]) == 0
    assert backend.get("a", torch.zeros(PAGE_NUMEL, dtype=DTYPE)) is None
    assert backend.set("b", page_for("b")) is False
    assert backend.clear() is False


def test_get_stats_does_not_fail(tmp_path: Path) -> None:
    backend = build(storage_config(tmp_path, metrics=True), host_pool("page_first"))
    try:
        assert backend.batch_set_v1(["s"], indices_of([0])) == [True]
        assert backend.batch_get_v1(["s"], indices_of([1])) == [True]
        assert backend.batch_get(["s"], [torch.zeros(PAGE_NUMEL, dtype=DTYPE)])[0] is not None
        stats = backend.get_stats()  # SGLang's StorageMetrics where its module imports
        if stats is not None:
            assert stats.backup_pgs == [1] and stats.prefetch_pgs == [1, 1]
            assert backend.get_stats().prefetch_pgs == []  # handed out once
        else:
            assert inner(backend)._metrics["prefetch_pgs"] == [1, 1]
        assert inner(backend).lmtier_stats()["entries"] == 1
    finally:
        backend.close()


def test_get_stats_hands_out_sglang_storage_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where SGLang's metrics module is loaded (a server collecting storage metrics), with the
    fields of its StorageMetrics (sglang/srt/observability/metrics_collector.py)."""
    import dataclasses
    import sys
    import types

    @dataclasses.dataclass
    class StorageMetrics:
        prefetch_pgs: list[int] = dataclasses.field(default_factory=list)
        backup_pgs: list[int] = dataclasses.field(default_factory=list)
        prefetch_bandwidth: list[float] = dataclasses.field(default_factory=list)
        backup_bandwidth: list[float] = dataclasses.field(default_factory=list)

    module = sys.modules.get("sglang.srt.observability.metrics_collector")
    if module is None or not hasattr(module, "StorageMetrics"):
        module = types.ModuleType("sglang.srt.observability.metrics_collector")
        module.StorageMetrics = StorageMetrics  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
    backend = build(storage_config(tmp_path, metrics=True), host_pool("page_first"))
    try:
        assert backend.batch_set_v1(["s", "t"], indices_of([0, 1])) == [True, True]
        assert backend.batch_get_v1(["s", "u"], indices_of([2, 3])) == [True, False]
        stats = backend.get_stats()
        assert isinstance(stats, module.StorageMetrics)
        assert stats.backup_pgs == [2] and stats.prefetch_pgs == [1]
        assert len(stats.backup_bandwidth) == 1 and stats.backup_bandwidth[0] > 0
        assert backend.get_stats().backup_pgs == []  # each transfer is handed out once
    finally:
        backend.close()


def test_the_activity_line_counts_lookups_pages_and_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, "lmtier.integrations.activity")
    backend = build(storage_config(tmp_path))
    keys = [f"a{i}" for i in range(4)]
    assert backend.batch_set(keys, [page_for(k) for k in keys])
    assert backend.batch_exists([*keys, "missing", "a0"]) == 4
    pages = backend.batch_get([*keys[:2], "missing"], [None, None, None])
    assert [page is not None for page in pages] == [True, True, False]
    backend.close()  # the store's close writes the last line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0] == (
        "lmtier HiCache storage tp0: 6 lookups, 4 hits (66.7%); 4 blocks stored, "
        "2 loaded (1 failed); cpu 2.0 KiB of 4.0 KiB, disk 0 B of 2.0 MiB"
    )
