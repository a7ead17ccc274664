"""``lmtier stress --config``: a working set sized to reach every tier, a failure naming any
tier never reached, and nothing left behind in the configured folders and servers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmtier.cli import main
from lmtier.cli.stress.plan import DEFAULT_MAX_BYTES, OVERFILL, plan_stress
from lmtier.cli.stress.run import StressOptions
from lmtier.config import GB, MB, load_config
from lmtier.tiers.base import Tier

from redis_helpers import RedisProcess, need_redis

REPO = Path(__file__).resolve().parent.parent
# Entries of 4-8 tokens (2-4 KiB), so that small budgets take many keys.
SMALL = ["--tasks", "4", "--min-tokens", "4", "--max-tokens", "8", "--no-progress"]


def _config(tmp_path: Path, *tiers: str) -> Path:
    path = tmp_path / "stress.yaml"
    path.write_text("tiers:\n" + "".join(f"  - {{{tier}}}\n" for tier in tiers))
    return path


def _tier_rows(out: str) -> dict[str, list[str]]:
    """The per-tier table: tier name -> its cells (entries, resident, budget, hits, ...)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["tier", "entries"])
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_a_small_cpu_disk_config_reaches_every_tier_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "not-yet" / "disk"
    config = _config(
        tmp_path,
        "name: cpu, kind: memory, max_size_mb: 0.25",
        f"name: disk, kind: disk, path: {disk}, max_size_mb: 0.5",
    )
    assert main(["stress", "--config", str(config), "--ops", "800", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "never reached" not in out
    rows = _tier_rows(out)
    assert set(rows) == {"cpu", "disk"}
    assert int(rows["disk"][7]) > 0, "entries were demoted into the disk tier"  # demotions in
    assert int(rows["disk"][10]) > 0, "the disk tier was overfilled: it dropped"  # drops
    assert not (tmp_path / "not-yet").exists(), "the folders the run created are removed"


def test_a_config_folder_keeps_what_others_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "disk"
    other = disk / "ns-0123456789abcdef"
    other.mkdir(parents=True)
    (other / "LOCK").write_text("")
    config = _config(
        tmp_path,
        "name: cpu, kind: memory, max_size_mb: 0.25",
        f"name: disk, kind: disk, path: {disk}, max_size_mb: 0.5",
    )
    assert main(["stress", "--config", str(config), "--ops", "600", *SMALL]) == 0
    assert sorted(p.name for p in disk.rglob("*")) == ["LOCK", other.name]


@pytest.mark.redis
def test_a_cpu_disk_redis_config_reaches_every_tier_and_deletes_its_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    need_redis()
    server = RedisProcess(tmp_path / "redis").start()
    try:
        server.cli("set", "someone:else", "kept")
        config = _config(
            tmp_path,
            "name: cpu, kind: memory, max_size_mb: 0.25",
            f"name: disk, kind: disk, path: {tmp_path / 'disk'}, max_size_mb: 0.25",
            f"name: remote, kind: redis, url: '{server.url}', max_size_mb: 0.5",
        )
        assert main(["stress", "--config", str(config), "--ops", "1200", *SMALL]) == 0
        out = capsys.readouterr().out
        assert "OK:" in out and "never reached" not in out
        assert int(_tier_rows(out)["remote"][7]) > 0, "entries were demoted into redis"
        assert server.cli("dbsize") == "1", "the run's keys are deleted, no other"
        assert server.cli("get", "someone:else") == "kept"
        assert not (tmp_path / "disk").exists(), "the folder the run created is removed"
    finally:
        server.kill()


@pytest.mark.redis
def test_a_configured_key_prefix_is_kept_beneath(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run writes under the configured prefix (all an ACL may allow), in a part of its own."""
    need_redis()
    server = RedisProcess(tmp_path / "redis").start()
    seen: list[str] = []
    original = Tier.commit

    def spy(self: Tier, key: object, obj: object, size: int) -> None:
        if self.name == "remote":
            seen.append(obj.path)  # type: ignore[attr-defined]
        original(self, key, obj, size)  # type: ignore[arg-type]

    monkeypatch.setattr(Tier, "commit", spy)
    try:
        server.cli("set", "team:kv:theirs", "kept")
        config = _config(
            tmp_path,
            "name: cpu, kind: memory, max_size_mb: 0.25",
            f"name: remote, kind: redis, url: '{server.url}', max_size_mb: 0.5, "
            "key_prefix: 'team:kv'",
        )
        assert main(["stress", "--config", str(config), "--ops", "600", *SMALL]) == 0
        assert seen and all(name.startswith("team:kv:stress-") for name in seen)
        assert server.cli("keys", "*") == "team:kv:theirs"
    finally:
        server.kill()


def test_a_tier_the_bound_cannot_reach_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "disk"
    config = _config(
        tmp_path,
        "name: cpu, kind: memory, max_size_mb: 1",
        f"name: disk, kind: disk, path: {disk}, max_size_mb: 64",
    )
    assert main(["stress", "--config", str(config), "--max-bytes", "512K", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "would never reach tier(s) 'disk' (64 MiB)" in err
    suggested = re.search(r"pass --max-bytes (\d+)M", err)
    assert suggested is not None and "--allow-unreached" in err, err
    assert int(suggested.group(1)) >= OVERFILL * 65  # enough to overfill both tiers
    assert not disk.exists()


def test_allow_unreached_turns_the_failure_into_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(
        tmp_path,
        "name: cpu, kind: memory, max_size_mb: 1",
        f"name: disk, kind: disk, path: {tmp_path / 'disk'}, max_size_mb: 64",
    )
    argv = ["stress", "--config", str(config), "--max-bytes", "512K", *SMALL]
    assert main([*argv, "--allow-unreached"]) == 0
    out = capsys.readouterr().out
    assert "warning: tier 'disk' was never reached" in out and "OK:" in out


def test_a_tier_never_reached_fails_the_run_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan said the disk tier would be reached; its admission refuses every entry."""
    original = Tier.admits
    monkeypatch.setattr(
        Tier, "admits", lambda self, key, size: self.name != "disk" and original(self, key, size)
    )
    disk = tmp_path / "disk"
    config = _config(
        tmp_path,
        "name: cpu, kind: memory, max_size_mb: 0.25",
        f"name: disk, kind: disk, path: {disk}, max_size_mb: 0.5",
    )
    argv = ["stress", "--config", str(config), "--ops", "600", *SMALL]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "tier 'disk' was never reached" in out
    assert not disk.exists(), "a failed run removes what it wrote too"
    assert main([*argv, "--allow-unreached"]) == 0
    assert "warning: tier 'disk' was never reached" in capsys.readouterr().out


def test_the_shipped_configs_are_sized_past_the_default_bound() -> None:
    """Overfilling 8 + 50 GB is refused under the default bound, and planned above it."""
    config = load_config(REPO / "configs" / "cpu_disk.yaml", environ={})
    budgets = [(tier.name, tier.max_size_bytes) for tier in config.tiers]
    capped = plan_stress(StressOptions(), budgets)
    assert capped.unreachable == ["disk"]
    assert capped.written <= DEFAULT_MAX_BYTES < 58 * GB
    assert capped.uncapped_written is not None and capped.uncapped_written > OVERFILL * 58 * GB
    full = plan_stress(StressOptions(), budgets, max_bytes=200 * GB)
    assert full.unreachable == [] and full.uncapped_written is None
    assert full.working_set >= OVERFILL * 58 * GB * 0.999
    assert full.options.keys_per_task > StressOptions().keys_per_task


def test_the_plan_grows_from_the_defaults_and_keeps_what_was_given() -> None:
    budgets = [("cpu", 16 * MB), ("disk", 64 * MB)]
    plan = plan_stress(StressOptions(), budgets)
    assert plan.options == StressOptions()  # the defaults already overfill 80 MiB
    assert plan.unreachable == []
    given = plan_stress(StressOptions(ops=50, keys_per_task=2), budgets, 1, True, True)
    assert (given.options.ops, given.options.keys_per_task) == (50, 2)
    assert given.unreachable == ["disk"] and given.uncapped_written is None
    shared = plan_stress(StressOptions(shared_keys=True), [("cpu", MB), ("disk", 2 * MB)])
    assert shared.options.keys_per_task >= 64 and shared.unreachable == []


@pytest.mark.redis
async def test_clear_prefix_deletes_only_its_own_prefix_taken_literally(tmp_path: Path) -> None:
    need_redis()
    from lmtier.evictor import make_evictor
    from lmtier.tiers.remote import RemoteTier

    server = RedisProcess(tmp_path / "redis").start()
    try:
        names = ["a*[b]:1", "a*[b]:2", "aXb:1", "a*[b]x:1", "a*[b]"]
        for name in names:
            server.cli("set", name, "v")
        tier = RemoteTier("remote", make_evictor("lru", MB), server.url, key_prefix="a*[b]")
        await tier.open()
        try:
            assert await tier.clear_prefix() == 2
        finally:
            await tier.close()
        assert sorted(server.cli("keys", "*").split()) == sorted(names[2:])
    finally:
        server.kill()


@pytest.mark.redis
async def test_a_server_down_at_the_end_is_a_warning_naming_the_prefix(tmp_path: Path) -> None:
    need_redis()
    from lmtier.cli.stress.space import StressSpace
    from lmtier.config import StoreConfig, TierConfig

    from redis_helpers import free_port, remote_spec

    nobody = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    disk = TierConfig("disk", "disk", MB, path=str(tmp_path / "disk"))
    space = StressSpace(StoreConfig((disk, remote_spec(nobody, MB, key_prefix="team"))))
    space.folders[0].mkdir(parents=True)
    failures = await space.remove()
    assert len(failures) == 1 and "could not delete the values under 'team:stress-" in failures[0]
    assert not (tmp_path / "disk").exists(), "the disk part is removed all the same"


@pytest.mark.redis
def test_a_redis_tier_unreachable_the_whole_run_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    need_redis()
    from redis_helpers import free_port

    nobody = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    config = _config(
        tmp_path,
        "name: cpu, kind: memory, max_size_mb: 0.25",
        f"name: remote, kind: redis, url: '{nobody}', max_size_mb: 0.5",
    )
    assert main(["stress", "--config", str(config), "--ops", "600", *SMALL]) == 1
    out = capsys.readouterr().out
    assert "tier 'remote' was never reached: its server was unreachable the whole run" in out
    assert "FAILED" in out
