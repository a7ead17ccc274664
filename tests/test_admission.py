"""Admission: the second_hit filter, in tier configs, in the store and in the sizes-only sim."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from lmtier.admission import ADMISSION_POLICIES, AdmitAll, SecondHit, make_admission
from lmtier.cli.replay.cascade_sim import CascadeSim, SimTier
from lmtier.config import StoreConfig, TierConfig, load_config, parse_config
from lmtier.errors import ConfigError
from lmtier.evictor import PutStatus
from lmtier.store import TieredStore

from store_helpers import DropLog

CHUNK = 1024  # bytes of one test chunk (256 float32)


def chunk(value: float) -> torch.Tensor:
    return torch.full((CHUNK // 4,), value, dtype=torch.float32)


# ---------------------------------------------------------------------- the filter alone
def test_second_hit_refuses_the_first_offer_and_admits_the_second() -> None:
    gate = SecondHit(capacity_bytes=10 * CHUNK)
    assert gate.admits("a", CHUNK) is False
    assert gate.admits("b", CHUNK) is False
    assert gate.admits("a", CHUNK) is True
    assert gate.admits("a", CHUNK) is True  # a known reuser stays known


def test_a_hit_counts_as_a_sighting() -> None:
    gate = SecondHit(capacity_bytes=10 * CHUNK)
    gate.observe("a", CHUNK)
    assert gate.admits("a", CHUNK) is True


def test_the_ghost_is_bounded_by_its_window_oldest_first() -> None:
    gate = SecondHit(capacity_bytes=10 * CHUNK, window=3)
    for key in "abcd":
        assert not gate.admits(key, CHUNK)
    assert len(gate) == 3
    assert not gate.admits("a", CHUNK)  # forgotten: a first offer again
    assert gate.admits("d", CHUNK)


def test_the_default_window_is_a_multiple_of_the_capacity_in_entries() -> None:
    gate = SecondHit(capacity_bytes=10 * CHUNK)
    for key in range(1000):
        gate.admits(key, CHUNK)
    assert len(gate) == 40  # 4 x 10 entries of this size


def test_admission_policies_by_name() -> None:
    assert ADMISSION_POLICIES == ("all", "second_hit")
    assert isinstance(make_admission("all", CHUNK), AdmitAll)
    assert make_admission("all", CHUNK).admits("x", CHUNK)
    assert isinstance(make_admission("second_hit", CHUNK, 5), SecondHit)
    with pytest.raises(ConfigError, match="unknown admission policy 'lfu'"):
        make_admission("lfu", CHUNK)
    with pytest.raises(ConfigError, match="window"):
        SecondHit(CHUNK, window=0)


# ---------------------------------------------------------------------- config
def test_admission_in_tier_configs_and_env(tmp_path: Path) -> None:
    raw = {
        "tiers": [
            {"name": "cpu", "kind": "memory", "max_size_mb": 1},
            {"name": "disk", "kind": "disk", "path": str(tmp_path), "max_size_mb": 4,
             "admission": "second_hit", "admission_window": 500},
        ]
    }  # fmt: skip
    config = parse_config(raw)
    assert config.tiers[0].admission == "all" and config.tiers[0].admission_window is None
    assert (config.tiers[1].admission, config.tiers[1].admission_window) == ("second_hit", 500)
    raw["tiers"][1]["admission"] = "twice"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"'admission' has unknown value 'twice'"):
        parse_config(raw)
    raw["tiers"][1]["admission"] = "second_hit"  # type: ignore[index]
    raw["tiers"][1]["admission_window"] = 0  # type: ignore[index]
    with pytest.raises(ConfigError, match="admission_window"):
        parse_config(raw)
    path = tmp_path / "c.yaml"
    path.write_text(
        "tiers:\n  - {name: cpu, kind: memory, max_size_mb: 1}\n"
        f"  - {{name: disk, kind: disk, path: {tmp_path}, max_size_mb: 4}}\n"
    )
    env = {"LMTIER_DISK__ADMISSION": "second_hit", "LMTIER_DISK__ADMISSION_WINDOW": "64"}
    tier = load_config(path, env).tiers[1]
    assert (tier.admission, tier.admission_window) == ("second_hit", 64)


# ---------------------------------------------------------------------- the store
def cpu_disk(root: Path, cpu: str = "all", disk: str = "second_hit") -> StoreConfig:
    return StoreConfig(
        tiers=(
            TierConfig("cpu", "memory", 2 * CHUNK, admission=cpu),
            TierConfig("disk", "disk", 4 * CHUNK, path=str(root / "disk"), admission=disk),
        ),
        room_timeout_s=30.0,
    )


async def test_a_refused_demotion_is_dropped_and_counted(tmp_path: Path) -> None:
    drops = DropLog()
    async with TieredStore(cpu_disk(tmp_path), on_drop=drops) as store:
        for i in range(3):  # cpu holds 2: "k0" is demoted, offered to disk for the first time
            assert await store.put(f"k{i}", chunk(i)) is PutStatus.LEGAL
        assert drops.keys == ["k0"] and await store.get("k0") is None
        stats = store.stats()["tiers"]
        assert stats["disk"]["admission_rejects"] == 1 and stats["disk"]["entries"] == 0
        assert stats["cpu"]["drops"] == 1 and stats["disk"]["bytes_in"] == 0
        assert stats["cpu"]["bytes_in"] == 3 * CHUNK
        assert store.audit() == []
        # put again, demoted again: the second offer is admitted and written to disk
        assert await store.put("k0", chunk(0)) is PutStatus.LEGAL
        for i in range(3, 5):
            await store.put(f"k{i}", chunk(i))
        assert await store.contains("k0") == "disk"
        stats = store.stats()["tiers"]
        assert stats["disk"]["bytes_in"] == CHUNK and stats["disk"]["demotions_in"] == 1
        assert torch.equal(await store.get("k0"), chunk(0))  # type: ignore[arg-type]
        assert store.audit() == []


async def test_a_hit_upstairs_lets_the_first_demotion_in(tmp_path: Path) -> None:
    async with TieredStore(cpu_disk(tmp_path)) as store:
        await store.put("hot", chunk(1))
        assert await store.get("hot") is not None  # a hit: evidence of reuse
        for i in range(4):
            await store.put(f"cold{i}", chunk(i))
        assert await store.contains("hot") == "disk"
        assert store.stats()["tiers"]["disk"]["admission_rejects"] == 2  # cold0 and cold1
        assert store.audit() == []


async def test_a_refused_put_falls_through_to_the_next_tier(tmp_path: Path) -> None:
    async with TieredStore(cpu_disk(tmp_path, cpu="second_hit", disk="all")) as store:
        assert await store.put("a", chunk(1)) is PutStatus.LEGAL
        assert await store.contains("a") == "disk"
        assert await store.put("a", chunk(2)) is PutStatus.LEGAL  # second offer: cpu takes it
        assert await store.contains("a") == "cpu"
        assert torch.equal(await store.get("a"), chunk(2))  # type: ignore[arg-type]
        assert store.stats()["tiers"]["cpu"]["admission_rejects"] == 1
        assert store.audit() == []


async def test_a_put_no_tier_admits_is_illegal_at_once(tmp_path: Path) -> None:
    both = cpu_disk(tmp_path, cpu="second_hit", disk="second_hit")
    async with TieredStore(both) as store:
        # A refusal is final: the put must not wait for room (the timeout is 30 s).
        status = await asyncio.wait_for(store.put("a", chunk(1)), timeout=5)
        assert status is PutStatus.ILLEGAL and await store.contains("a") is None
        assert await store.put("a", chunk(1)) is PutStatus.LEGAL  # each tier saw it once
        assert await store.contains("a") == "cpu"
        tiers = store.stats()["tiers"]
        assert (tiers["cpu"]["admission_rejects"], tiers["disk"]["admission_rejects"]) == (1, 1)
        assert store.audit() == []


async def test_the_store_and_the_sim_decide_alike_with_admission(tmp_path: Path) -> None:
    rng = random.Random(7)
    keys = [rng.randrange(12) for _ in range(300)]
    config = StoreConfig(
        tiers=(
            TierConfig("gpu", "memory", 2 * CHUNK, admission="second_hit", admission_window=6),
            TierConfig("cpu", "memory", 3 * CHUNK),
            TierConfig("disk", "disk", 4 * CHUNK, path=str(tmp_path), admission="second_hit"),
        )
    )
    sim = CascadeSim(
        [
            SimTier("gpu", 2 * CHUNK, admission="second_hit", admission_window=6),
            SimTier("cpu", 3 * CHUNK),
            SimTier("disk", 4 * CHUNK, admission="second_hit"),
        ]
    )
    names = [tier.name for tier in sim.tiers]
    async with TieredStore(config) as store:
        for number in keys:
            key = f"k{number}"
            where = await store.contains(key)
            got, hit = await store.get(key), sim.get(key)
            assert (None if hit is None else names[hit]) == where
            if got is None:
                status = await store.put(key, chunk(number))
                assert sim.put(key, CHUNK) is (status is PutStatus.LEGAL)
        assert store.audit() == []
        real = store.stats()["tiers"]
    for tier in sim.tiers:
        for counter, value in tier.counters.as_dict().items():
            assert real[tier.name][counter] == value, (tier.name, counter)
    assert sum(t.counters.admission_rejects for t in sim.tiers) > 0


# ---------------------------------------------------------------------- the replay
def test_replay_admission_writes_less_to_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    from lmtier.cli import main

    trace = str(Path(__file__).parent / "data" / "conversation_trace.jsonl")
    written = {}
    for admission in ("all", "second_hit"):
        out = tmp_path / f"{admission}.csv"
        args = ["replay", trace, "--limit", "600", "--capacities", "0.1", "--split", "1,4",
                "--admission", admission, "--csv", str(out), "--no-progress"]  # fmt: skip
        assert main(args) == 0
        disk = next(r for r in csv.DictReader(out.open()) if r["tier"] == "disk")
        assert disk["admission"] == ("" if admission == "all" else "disk=second_hit")
        written[admission] = int(disk["bytes_written"])
        assert (int(disk["admission_rejects"]) > 0) is (admission == "second_hit")
    assert 0 < written["second_hit"] < written["all"] / 2
    assert "lru+disk=second_hit" in capsys.readouterr().out
    assert main(["replay", trace, "--limit", "50", "--admission", "ssd=second_hit"]) == 2
    assert "no tier named 'ssd'" in capsys.readouterr().err
    assert main(["replay", trace, "--limit", "50", "--admission", "third_hit"]) == 2
    assert "unknown admission policy" in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(6))
async def test_nothing_is_lost_and_accounting_holds_with_admission(
    tmp_path: Path, seed: int
) -> None:
    """Random puts, gets and deletes: a get returns the last admitted value unless it was
    dropped (and reported); a put no tier admits keeps the older value."""
    rng = random.Random(seed)
    drops = DropLog()
    config = StoreConfig(
        tiers=(
            TierConfig("gpu", "memory", 3 * CHUNK, admission="second_hit", admission_window=8),
            TierConfig("cpu", "memory", 4 * CHUNK),
            TierConfig("disk", "disk", 8 * CHUNK, path=str(tmp_path), admission="second_hit"),
        )
    )
    expected: dict[str, torch.Tensor] = {}
    async with TieredStore(config, on_drop=drops) as store:
        for step in range(250):
            key = f"k{rng.randrange(20)}"
            action = rng.random()
            if action < 0.5:
                tensor = torch.full((rng.choice([64, 128, 256]),), float(step))
                status = await store.put(key, tensor)
                forget(drops, expected)  # an older value of key may go while this one lands
                if status is PutStatus.LEGAL:
                    expected[key] = tensor
            elif action < 0.9:
                got = await store.get(key)
                want = expected.get(key)
                assert (got is None) == (want is None), (step, key)
                if want is not None:
                    assert torch.equal(got, want)  # type: ignore[arg-type]
            else:
                assert await store.delete(key) == (key in expected)
                expected.pop(key, None)
            forget(drops, expected)
            assert store.audit() == [], step
        tiers = store.stats()["tiers"]
    assert tiers["disk"]["admission_rejects"] > 0 and tiers["gpu"]["admission_rejects"] > 0


def forget(drops: DropLog, expected: dict[str, torch.Tensor]) -> None:
    for dropped in drops.keys:
        expected.pop(dropped, None)  # type: ignore[call-overload]
    drops.keys.clear()
