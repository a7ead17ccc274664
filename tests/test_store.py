"""TieredStore: the cascade, demotion, promotion, replacement, bad input and lifecycle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmtier import (
    CacheEngineKey,
    ConfigError,
    DeviceUnavailableError,
    InvalidKeyError,
    InvalidValueError,
    LmtierTypeError,
    PutStatus,
    StoreClosedError,
)
from lmtier.config import StoreConfig, TierConfig
from lmtier.keys import MAX_KEY_BYTES
from lmtier.store import TieredStore

from conftest import tensor_for
from store_helpers import KIB, cascade_config, make_store

# tensor_for(...) is 256 int32 = 1 KiB: gpu holds 4, cpu 8, disk 16.


async def test_put_get_contains_delete(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    async with store:
        assert await store.put("a", tensor_for("a")) is PutStatus.LEGAL
        assert await store.contains("a") == "gpu"
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("a"))
        assert await store.get("missing") is None
        assert await store.delete("a") is True
        assert await store.delete("a") is False
        assert await store.get("a") is None and await store.contains("a") is None
        assert store.audit() == []


async def test_victims_cascade_down_and_the_last_tier_drops(tmp_path: Path) -> None:
    store, drops = make_store(tmp_path, promote_on_hit=False)
    async with store:
        for i in range(30):
            assert await store.put(f"k{i}", tensor_for(f"k{i}")) is PutStatus.LEGAL
        where = [await store.contains(f"k{i}") for i in range(30)]
        assert where == [None] * 2 + ["disk"] * 16 + ["cpu"] * 8 + ["gpu"] * 4
        assert drops.keys == ["k0", "k1"]
        stats = store.stats()
        assert stats["drops"] == 2 and stats["entries"] == 28
        tiers = stats["tiers"]
        assert (tiers["gpu"]["demotions_out"], tiers["cpu"]["demotions_in"]) == (26, 26)
        assert (tiers["cpu"]["demotions_out"], tiers["disk"]["demotions_in"]) == (18, 18)
        for i in range(2, 30):
            got = await store.get(f"k{i}")
            assert got is not None and torch.equal(got, tensor_for(f"k{i}"))
        assert store.audit() == []
        assert [t["resident_bytes"] for t in tiers.values()] == [4 * KIB, 8 * KIB, 16 * KIB]


async def test_a_hit_below_the_top_is_copied_up(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    async with store:
        for i in range(20):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        assert await store.contains("k0") == "disk"
        disk_files_before = sum(1 for _ in (tmp_path / "disk").rglob("*.safetensors"))
        got = await store.get("k0")
        assert got is not None and torch.equal(got, tensor_for("k0"))
        assert await store.contains("k0") == "gpu"
        stats = store.stats()
        tiers = stats["tiers"]
        assert tiers["disk"]["promotions_out"] == 1 and tiers["gpu"]["promotions_in"] == 1
        assert tiers["disk"]["hits"] == 1 and tiers["gpu"]["misses"] == 1
        # k0's disk entry stays as a clean copy; the gpu victim went to cpu, a cpu victim to disk
        assert sum(1 for _ in (tmp_path / "disk").rglob("*.safetensors")) == disk_files_before + 1
        assert [t["clean_copies"] for t in tiers.values()] == [0, 0, 1]
        assert stats["entries"] == 20  # keys, each once
        assert store.audit() == []


async def test_without_promotion_a_hit_stays_put(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path, promote_on_hit=False)
    async with store:
        for i in range(20):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        await store.get("k0")
        assert await store.contains("k0") == "disk"


async def test_overwrite_replaces_wherever_the_key_was(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path, promote_on_hit=False)
    async with store:
        for i in range(20):
            await store.put(f"k{i}", tensor_for(f"k{i}"))
        assert await store.contains("k0") == "disk"
        await store.put("k0", tensor_for("k0", version=1, numel=512))
        assert await store.contains("k0") == "gpu"
        got = await store.get("k0")
        assert got is not None and torch.equal(got, tensor_for("k0", version=1, numel=512))
        assert store.stats()["entries"] == 20
        assert store.stats()["resident_bytes"] == 21 * KIB
        assert store.audit() == []
        files = list((tmp_path / "disk").rglob("*.safetensors"))
        assert len(files) == store.stats()["tiers"]["disk"]["entries"]


async def test_an_entry_too_big_for_a_tier_goes_to_the_next(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    async with store:
        assert await store.put("big", tensor_for("big", numel=1536)) is PutStatus.LEGAL  # 6 KiB
        assert await store.contains("big") == "cpu"
        assert await store.put("huge", tensor_for("huge", numel=4096)) is PutStatus.LEGAL
        assert await store.contains("huge") == "disk"
        assert await store.put("vast", tensor_for("vast", numel=8192)) is PutStatus.ILLEGAL
        assert await store.contains("vast") is None
        assert store.audit() == []


async def test_gets_return_copies_on_the_asked_device(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    async with store:
        await store.put("a", tensor_for("a"))
        got = await store.get("a", device="cpu")
        assert got is not None
        got.zero_()
        again = await store.get("a")
        assert again is not None and torch.equal(again, tensor_for("a"))


async def test_non_contiguous_tensors_are_stored_contiguous(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    strided = torch.arange(64, dtype=torch.float32).reshape(8, 8).t()
    async with store:
        await store.put("t", strided)
        got = await store.get("t")
        assert got is not None and got.is_contiguous() and torch.equal(got, strided)


async def test_put_many_and_get_many(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    async with store:
        items = [(f"k{i}", tensor_for(f"k{i}")) for i in range(10)] + [("k0", tensor_for("z"))]
        assert await store.put_many(items) == [PutStatus.LEGAL] * 11
        got = await store.get_many(["k0", "k5", "nope"])
        assert got[0] is not None and torch.equal(got[0], tensor_for("z"))
        assert got[1] is not None and torch.equal(got[1], tensor_for("k5"))
        assert got[2] is None
        assert store.audit() == []


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        (42, torch.ones(2), LmtierTypeError),
        (b"bytes", torch.ones(2), LmtierTypeError),
        ("", torch.ones(2), ValueError),
        ("k", [1.0, 2.0], LmtierTypeError),
        ("k", torch.ones(0), InvalidValueError),
        ("k", torch.ones(2, dtype=torch.complex64), InvalidValueError),
        ("k", torch.ones(2).to_sparse(), InvalidValueError),
        pytest.param(
            "k",
            torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
            InvalidValueError,
            id="nested",
        ),
        pytest.param("x" * (MAX_KEY_BYTES + 1), torch.ones(2), InvalidKeyError, id="long-key"),
        pytest.param(  # two bytes of UTF-8 each
            "\u00e9" * (MAX_KEY_BYTES // 2 + 1), torch.ones(2), InvalidKeyError, id="long-utf8"
        ),
        pytest.param(
            CacheEngineKey("f", "m" * MAX_KEY_BYTES, 1, 0, "h"),
            torch.ones(2),
            InvalidKeyError,
            id="long-engine-key",
        ),
    ],
)
async def test_bad_input_is_a_clear_error_and_the_store_stays_usable(
    tmp_path: Path, key: object, value: object, error: type[Exception]
) -> None:
    store, _ = make_store(tmp_path)
    async with store:
        with pytest.raises(error):
            await store.put(key, value)  # type: ignore[arg-type]
        with pytest.raises(error if value is not None else Exception):
            await store.put_many([("ok", tensor_for("ok")), (key, value)])  # type: ignore[list-item]
        assert await store.contains("ok") is None, "a bad batch stored part of itself"
        assert await store.put("ok", tensor_for("ok")) is PutStatus.LEGAL
        assert store.audit() == []


async def test_a_bad_device_is_a_clear_error(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    async with store:
        await store.put("a", tensor_for("a"))
        with pytest.raises(InvalidValueError, match="device"):
            await store.get("a", device="warp-drive")


def test_a_cuda_tier_without_cuda_is_skipped_unless_required(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the cuda-marked tests cover it there
    tiers = (
        TierConfig("gpu", "memory", KIB, device="cuda"),
        TierConfig("cpu", "memory", KIB),
    )
    assert [t.name for t in TieredStore(StoreConfig(tiers)).tiers] == ["cpu"]
    required = (TierConfig("gpu", "memory", KIB, device="cuda", required=True), tiers[1])
    with pytest.raises(DeviceUnavailableError, match="gpu"):
        TieredStore(StoreConfig(required))
    with pytest.raises(ConfigError, match="no tier"):
        TieredStore(StoreConfig(tiers[:1]))


async def test_close_finishes_work_and_is_idempotent(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    await store.put("a", tensor_for("a"))
    await store.close()
    await store.close()
    with pytest.raises(StoreClosedError):
        await store.put("b", tensor_for("b"))
    with pytest.raises(StoreClosedError):
        await store.get("a")


async def test_from_config_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "store.yaml"
    path.write_text(
        "tiers:\n"
        "  - {name: cpu, kind: memory, device: cpu, max_size_mb: 1}\n"
        f"  - {{name: disk, kind: disk, path: {tmp_path / 'd'}, max_size_mb: 4}}\n"
    )
    monkeypatch.setenv("LMTIER_CONFIG", str(path))
    monkeypatch.setenv("LMTIER_CPU__MAX_SIZE_MB", "2")
    async with TieredStore.from_config_file() as store:
        assert [t.budget for t in store.tiers] == [2 * 1024**2, 4 * 1024**2]
        await store.put("a", tensor_for("a"))
        assert await store.contains("a") == "cpu"


def test_default_configs_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTIER_DISK__PATH", str(tmp_path))
    root = Path(__file__).parent.parent / "configs"
    for name in ("default.yaml", "cpu_disk.yaml"):
        store = TieredStore.from_config_file(root / name)
        assert store.tiers[-1].name == "disk"


async def test_stats_has_every_counter_per_tier(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    async with store:
        tiers = store.stats()["tiers"]
    expected = {
        "entries", "resident_bytes", "budget_bytes", "hits", "misses", "puts", "evictions",
        "demotions_in", "demotions_out", "promotions_in", "promotions_out", "drops", "corrupt",
        "errors", "room_timeouts", "admission_rejects", "bytes_in", "bytes_out", "unavailable",
        "fetched", "pinned_entries", "pinned_bytes", "moving_out", "unwritten_demotions",
        "copies_evicted", "clean_copies", "written_ahead",
    }  # fmt: skip
    assert list(tiers) == ["gpu", "cpu", "disk"]
    assert all(set(t) == expected for t in tiers.values())
    assert cascade_config(tmp_path).tiers[0].max_size_bytes == tiers["gpu"]["budget_bytes"]


async def test_get_into_a_preallocated_buffer(tmp_path: Path) -> None:
    store, _ = make_store(tmp_path)
    async with store:
        await store.put("a", tensor_for("a"))
        for _ in range(6):  # a on disk too
            await store.put(f"x{_}", tensor_for("x"))
        for key in ("a", "x5"):
            out = torch.empty(256, dtype=torch.int32)
            got = await store.get(key, out=out)
            assert got is out and torch.equal(out, tensor_for(key if key == "a" else "x"))
        with pytest.raises(InvalidValueError, match="out is"):
            await store.get("a", out=torch.empty(3, dtype=torch.int32))
        assert store.audit() == []
        assert await store.get("a") is not None


async def test_a_full_memory_tier_writes_into_the_buffers_of_its_demoted_entries(
    tmp_path: Path,
) -> None:
    config = StoreConfig(
        tiers=(
            TierConfig("cpu", "memory", 4 * KIB),
            TierConfig("disk", "disk", 64 * KIB, path=str(tmp_path)),
        )
    )
    async with TieredStore(config) as store:
        cpu = store.tiers[0]
        for i in range(4):
            await store.put(f"first{i}", tensor_for(f"first{i}"))
        buffers = {cpu.lookup(f"first{i}").untyped_storage().data_ptr() for i in range(4)}
        for i in range(12):  # each put demotes one entry to disk
            await store.put(f"k{i}", tensor_for(f"k{i}"))
            assert cpu.lookup(f"k{i}").untyped_storage().data_ptr() in buffers
        assert store.stats()["tiers"]["cpu"]["demotions_out"] == 12
        for i in range(12):
            got = await store.get(f"k{i}")
            assert got is not None and torch.equal(got, tensor_for(f"k{i}"))
        assert store.audit() == []


async def test_a_put_that_evicts_its_own_older_value_reports_no_drop() -> None:
    # The last tier is full and its LRU victim for the new "a" is the old "a": the old value
    # goes, the new one lands, so the key was never gone and its position stays known.
    dropped: list[object] = []
    config = StoreConfig((TierConfig("cpu", "memory", 2 * KIB),))
    async with TieredStore(config, on_drop=dropped.append) as store:
        await store.put("a", tensor_for("a"), position=3)
        await store.put("b", tensor_for("b"))
        assert await store.put("a", tensor_for("b"), position=3) is PutStatus.LEGAL
        assert dropped == []
        got = await store.get("a")
        assert got is not None and torch.equal(got, tensor_for("b"))
        assert store._ledger.positions["a"] == 3
        await store.put("c", tensor_for("c"))  # evicts "b", the least recent: a real drop
        assert dropped == ["b"]
        assert store.audit() == []


async def test_a_put_that_evicts_its_own_older_value_and_then_fails_reports_the_drop() -> None:
    dropped: list[object] = []
    config = StoreConfig((TierConfig("cpu", "memory", 2 * KIB),), room_timeout_s=0.2)
    async with TieredStore(config, on_drop=dropped.append) as store:
        await store.put("a", tensor_for("a"))
        await store.put("b", tensor_for("b"))
        tier = store.tiers[0]
        real_write = tier._write

        async def failing_write(key: object, tensor: torch.Tensor) -> object:
            raise OSError("injected: the write of the new value fails")

        tier._write = failing_write  # type: ignore[method-assign]
        assert await store.put("a", tensor_for("c")) is PutStatus.ILLEGAL
        tier._write = real_write  # type: ignore[method-assign]
        assert dropped == ["a"]  # the old value went and the new one never landed
        assert await store.get("a") is None
        assert store.audit() == []


def one_tier_stores(root: Path) -> list[TieredStore]:
    return [
        TieredStore(StoreConfig((TierConfig("cpu", "memory", 64 * KIB),))),
        TieredStore(StoreConfig((TierConfig("disk", "disk", 64 * KIB, path=str(root)),))),
    ]


async def test_a_key_at_the_length_limit_round_trips_through_every_tier(tmp_path: Path) -> None:
    key = "k" * MAX_KEY_BYTES
    for store in one_tier_stores(tmp_path):
        async with store:
            assert await store.put(key, tensor_for("k")) is PutStatus.LEGAL
            got = await store.get(key)
            assert got is not None and torch.equal(got, tensor_for("k"))


async def test_negative_and_conjugate_views_keep_their_values_in_every_tier(
    tmp_path: Path,
) -> None:
    values = {
        "neg": torch._neg_view(torch.arange(1.0, 65.0)),
        "conj": torch.tensor([1 + 2j]).conj().imag,  # one element, its negative bit set
    }
    for store in one_tier_stores(tmp_path):
        async with store:
            for key, value in values.items():
                assert await store.put(key, value) is PutStatus.LEGAL
                got = await store.get(key)
                assert got is not None and got.tolist() == value.tolist(), key
                for out in (torch.empty_like(value), torch._neg_view(torch.empty_like(value))):
                    assert await store.get(key, out=out) is out
                    assert out.tolist() == value.tolist(), (key, out.is_neg())
