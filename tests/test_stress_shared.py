"""``lmtier stress --shared-keys``: tasks that share keys, overwrite, delete and give up."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from lmtier.cli import main
from lmtier.cli.stress.run import StressOptions, shared_stress_config, with_policy
from lmtier.cli.stress.shared import run_shared_stress
from lmtier.config import MB
from lmtier.evictor import evictor_names
from lmtier.store import TieredStore

from redis_helpers import RedisProcess, need_redis, remote_spec


@pytest.mark.parametrize("policy", evictor_names())
async def test_shared_keys_stress_is_clean(policy: str, tmp_path: Path) -> None:
    config = with_policy(shared_stress_config(tmp_path), policy)
    options = StressOptions(
        tasks=32, ops=800, keys_per_task=48, progress=False, shared_keys=True, rounds=2
    )
    async with TieredStore(config) as store:
        report = await run_shared_stress(store, options)
    assert report.problems == []
    assert report.wrong_reads == report.audit_failures == report.budget_breaches == 0
    assert report.raw_exceptions == 0
    assert report.cancelled > 0 and report.verified > 0 and report.audits > 0
    assert store.stats()["drops"] > 0  # the key space spills through every tier


def test_shared_keys_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["stress", "--shared-keys", "--policy", "arc", "--tasks", "16", "--ops", "320"]
    assert main([*argv, "--keys-per-task", "32", "--rounds", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "evictor arc" in out and "wrong reads 0" in out and "OK:" in out


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["stress", "--shared-keys", "--policy", "nope"])


@pytest.mark.redis
@pytest.mark.timeout(400)  # a fixed workload: on a loaded machine it takes minutes
async def test_shared_keys_stress_survives_a_redis_tier_killed_and_restarted(
    tmp_path: Path,
) -> None:
    """cpu -> disk -> redis: the server is killed once demotions reach it and restarted
    (empty) once the store has noticed; no wrong read, failed audit, breach or raw exception."""
    need_redis()
    server = RedisProcess(tmp_path / "redis").start()
    base = shared_stress_config(tmp_path / "disk")
    config = dataclasses.replace(
        base,
        tiers=(*base.tiers[1:], remote_spec(server.url, 2 * MB)),
        room_timeout_s=5,  # puts that give up are part of this workload (ILLEGAL is fine)
    )
    options = StressOptions(
        tasks=32, ops=3200, keys_per_task=64, progress=False, shared_keys=True, rounds=2
    )
    try:
        async with TieredStore(config) as store:
            remote = store.tiers[-1]
            stress = asyncio.ensure_future(run_shared_stress(store, options))
            while remote.counters.demotions_in < 20 and not stress.done():
                await asyncio.sleep(0.01)
            server.kill()
            while remote.counters.unavailable == 0 and not stress.done():
                await asyncio.sleep(0.01)
            await asyncio.to_thread(server.start)
            report = await stress
            landed_after = remote.counters.demotions_in
    finally:
        server.kill()
    assert report.problems == []
    assert report.wrong_reads == report.audit_failures == report.budget_breaches == 0
    assert report.raw_exceptions == 0
    assert remote.counters.unavailable > 0, "the kill did not land mid-run"
    assert landed_after > 20, "nothing reached the restarted server"
