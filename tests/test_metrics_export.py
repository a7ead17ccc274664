"""A store's Prometheus metrics, scraped over HTTP: they agree with stats(), their histograms
count every operation, each store has its own registry and port, and close() stops serving."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.error
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest

from lmtier import ConfigError, StorageError, TieredStore
from lmtier.config import MetricsConfig, StoreConfig, TierConfig
from lmtier.engine import ChunkSpec, KVCacheEngine
from lmtier.monitoring import CATALOGUE, NO_TIER
from lmtier.monitoring.on_loop import LoopHome, call_on_loop

from metrics_helpers import Samples, exposed_names, scrape, value

KIB = 1024
STAT_SPECS = [spec for spec in CATALOGUE if spec.origin == "stat" and not spec.redis_only]
HISTOGRAMS = [spec for spec in CATALOGUE if spec.origin == "histogram"]


def config(root: Path, port: int = 0, cpu: int = 8 * KIB) -> StoreConfig:
    """cpu -> disk, serving metrics on loopback."""
    return StoreConfig(
        tiers=(
            TierConfig("cpu", "memory", cpu),
            TierConfig("disk", "disk", 64 * KIB, path=str(root / "disk")),
        ),
        metrics=MetricsConfig(port=port, host="127.0.0.1"),
    )


def chunk(number: int) -> torch.Tensor:
    return torch.full((512,), float(number))  # 2 KiB


async def scrape_quiet(store: TieredStore) -> tuple[Samples, dict[str, str], dict[str, dict]]:
    """A scrape (from another thread, as a Prometheus server's) and the stats() it must match;
    the store did nothing in between."""
    before = store.stats()["tiers"]
    samples, types = await asyncio.to_thread(scrape, store.metrics_port or 0)
    assert store.stats()["tiers"] == before, "the store moved entries during the scrape"
    return samples, types, before


async def test_every_counter_and_gauge_matches_stats(tmp_path: Path) -> None:
    async with TieredStore(config(tmp_path)) as store:
        for number in range(6):  # the cpu tier holds 4: k0 and k1 are demoted to disk
            await store.put(f"k{number}", chunk(number))
        assert await store.get("k5") is not None  # a cpu hit
        assert await store.get("k0") is not None  # a disk hit, promoted (k2 demoted for it)
        assert await store.get("absent") is None
        assert store.pin("k5") == "cpu"
        samples, types, stats = await scrape_quiet(store)
        store.unpin("k5")
    for tier in ("cpu", "disk"):
        # every stat is exported, so a stat added later cannot be forgotten here
        assert set(stats[tier]) == {spec.source for spec in STAT_SPECS}
        for spec in STAT_SPECS:
            assert value(samples, spec.name, tier=tier) == stats[tier][spec.source], spec.name
    # the operations above show in the counters they should
    assert stats["cpu"]["demotions_out"] == 3 and stats["disk"]["demotions_in"] == 3
    assert stats["disk"]["hits"] == stats["disk"]["promotions_out"] == 1
    assert stats["cpu"]["bytes_out"] == 4 * 2 * KIB  # a hit and three demotions
    assert stats["disk"]["bytes_out"] == 2 * KIB  # the hit; its promotion copies its bytes
    assert stats["disk"]["clean_copies"] == 1  # k0 stays on disk, a clean copy
    assert value(samples, "lmtier_pinned_bytes", tier="cpu") == 2 * KIB
    assert value(samples, "lmtier_budget_bytes", tier="disk") == 64 * KIB
    # a store without a redis tier emits every metric but the redis-only ones
    assert exposed_names(types) == {spec.name for spec in CATALOGUE if not spec.redis_only}
    assert {types[spec.name] for spec in HISTOGRAMS} == {"histogram"}


async def test_a_histograms_count_is_the_number_of_operations(tmp_path: Path) -> None:
    async with TieredStore(config(tmp_path)) as store:
        for number in range(7):
            await store.put(f"k{number}", chunk(number))
        refused = torch.zeros(64 * KIB)  # 256 KiB: larger than every tier
        assert (await store.put("huge", refused)).name == "ILLEGAL"
        gets = [await store.get(key) for key in ("k6", "k5", "k0", "k1", "none1", "none2")]
        samples, _, stats = await scrape_quiet(store)

    def count(name: str, tier: str) -> float:
        return value(samples, f"{name}_count", tier=tier)

    assert count("lmtier_put_duration_seconds", "cpu") == 7
    assert count("lmtier_put_duration_seconds", NO_TIER) == 1
    assert count("lmtier_put_size_bytes", "cpu") == 7
    assert value(samples, "lmtier_put_size_bytes_sum", tier=NO_TIER) == refused.nbytes
    assert count("lmtier_get_duration_seconds", NO_TIER) == gets.count(None) == 2
    for tier in ("cpu", "disk"):
        assert count("lmtier_get_duration_seconds", tier) == stats[tier]["hits"]
        assert count("lmtier_get_size_bytes", tier) == stats[tier]["hits"]
    assert stats["disk"]["hits"] == 2 and stats["cpu"]["hits"] == 2
    # a disk entry is read to serve a hit and to demote it (nothing was: disk is the last tier)
    loads = stats["disk"]["hits"] + stats["disk"]["demotions_out"]
    assert count("lmtier_load_duration_seconds", "disk") == loads
    assert value(samples, "lmtier_load_size_bytes_sum", tier="disk") == loads * 2 * KIB
    # a memory tier's loads are not timed (the get is): it has no load series
    assert frozenset({("tier", "cpu")}) not in samples["lmtier_load_duration_seconds_count"]
    for spec in HISTOGRAMS:
        for labels, total in samples[f"{spec.name}_count"].items():
            buckets = {
                dict(key)["le"]: n
                for key, n in samples[f"{spec.name}_bucket"].items()
                if key - {("le", dict(key)["le"])} == labels
            }
            ordered = sorted(buckets.items(), key=lambda item: float(item[0]))
            assert [n for _, n in ordered] == sorted(buckets.values()), "cumulative buckets"
            assert buckets["+Inf"] == total
            assert (samples[f"{spec.name}_sum"][labels] > 0) == (total > 0)


async def test_two_stores_have_their_own_registry_and_port(tmp_path: Path) -> None:
    first = TieredStore(config(tmp_path / "a"))
    second = TieredStore(config(tmp_path / "b"))
    async with first, second:
        assert first.metrics.registry is not second.metrics.registry
        assert first.metrics_port != second.metrics_port
        await first.put("x", chunk(1))
        seen_first, _ = await asyncio.to_thread(scrape, first.metrics_port or 0)
        seen_second, _ = await asyncio.to_thread(scrape, second.metrics_port or 0)
    assert value(seen_first, "lmtier_puts_total", tier="cpu") == 1
    assert value(seen_second, "lmtier_puts_total", tier="cpu") == 0


async def test_closing_stops_the_server(tmp_path: Path) -> None:
    store = TieredStore(config(tmp_path))
    assert store.metrics_port is None  # not serving before the open
    async with store:
        port = store.metrics_port
        assert port
        await asyncio.to_thread(scrape, port)
    assert store.metrics_port is None
    with pytest.raises(urllib.error.URLError) as refused:
        await asyncio.to_thread(scrape, port)
    assert isinstance(refused.value.reason, ConnectionRefusedError)


async def test_without_a_port_nothing_listens_but_the_registry_is_there(tmp_path: Path) -> None:
    tiers = config(tmp_path).tiers
    texts = []
    for metrics in (None, MetricsConfig()):  # no section; a section without a port
        async with TieredStore(StoreConfig(tiers, metrics=metrics)) as store:
            await store.put("x", chunk(1))
            assert store.metrics_port is None
            texts.append(generate_latest(store.metrics.registry).decode())  # on the loop thread
            await store.delete("x")
    unmonitored, monitored = texts
    assert 'lmtier_puts_total{tier="cpu"} 1.0' in unmonitored
    assert 'lmtier_puts_total{tier="cpu"} 1.0' in monitored
    # only a store whose config has a metrics section times its operations
    assert "lmtier_put_duration_seconds" not in unmonitored
    assert 'lmtier_put_duration_seconds_count{tier="cpu"} 1.0' in monitored


async def test_a_port_in_use_is_an_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        store = TieredStore(config(tmp_path, port=port))
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port}: port {port} is in use"):
            await store.open()
        await store.close()
    # it failed before locking the disk folder, and left nothing bound
    async with TieredStore(config(tmp_path, port=port)) as again:
        assert again.metrics_port == port


async def test_a_failed_open_releases_the_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = TieredStore(config(tmp_path, port=port))

    async def broken() -> None:
        raise StorageError("injected: the disk folder cannot be used")

    monkeypatch.setattr(store.tiers[1], "open", broken)
    with pytest.raises(StorageError, match="injected"):
        await store.open()
    assert store.metrics_port is None
    # a retried open in this process (without closing the failed store) has the port again
    async with TieredStore(config(tmp_path / "retry", port=port)) as retry:
        assert retry.metrics_port == port
    await store.close()


async def test_engine_token_counters_match_a_prefix_lookup(tmp_path: Path) -> None:
    spec = ChunkSpec("tiny", chunk_size=4)
    async with TieredStore(config(tmp_path, cpu=2 * KIB)) as store:
        engine = KVCacheEngine(store, spec)
        tokens = list(range(16))
        kv = torch.randn(2, 2, 16, 2, 8)  # 1 KiB per 4-token chunk: the cpu tier holds two
        assert await engine.store(tokens, kv) == 16
        asked = [*tokens, 99, 98, 97, 96, 95, 94]
        hit = await engine.lookup(asked)
        expected: dict[str, int] = {}
        for piece in engine.chunks(tokens):
            tier = await store.contains(piece.key)
            assert tier is not None
            expected[tier] = expected.get(tier, 0) + piece.end - piece.start
        engine.release(asked)
        assert await engine.lookup([7, 7, 7, 7]) == 0
        counters = store.metrics.engine
        samples, _ = await asyncio.to_thread(scrape, store.metrics_port or 0)
    assert hit == 16 and sorted(expected) == ["cpu", "disk"]
    assert counters.lookups == 2 and counters.tokens == len(asked) + 4
    assert dict(counters.hit_tokens) == expected and sum(expected.values()) == hit
    assert value(samples, "lmtier_engine_lookups_total") == 2
    assert value(samples, "lmtier_engine_lookup_tokens_total") == len(asked) + 4
    for tier in ("cpu", "disk"):
        assert value(samples, "lmtier_engine_hit_tokens_total", tier=tier) == expected[tier]


async def test_a_read_runs_on_the_loop_and_without_it_when_the_loop_is_stuck() -> None:
    home = LoopHome()
    home.record()
    loop_thread = threading.get_ident()
    readers: list[int] = []

    def read() -> int:
        readers.append(threading.get_ident())
        return len(readers)

    assert call_on_loop(home, read) == 1  # on the loop's own thread: at once
    assert await asyncio.to_thread(call_on_loop, home, read) == 2  # from another: on the loop
    assert readers == [loop_thread, loop_thread]

    released = threading.Event()

    def scrape_then_release() -> int:
        try:
            return call_on_loop(home, read, timeout=0.05)
        finally:
            released.set()

    answer = asyncio.get_running_loop().run_in_executor(None, scrape_then_release)
    released.wait(10)  # a blocking call: the loop is stuck until the read answered without it
    assert released.is_set()
    assert await answer == 3 and readers[2] != loop_thread
