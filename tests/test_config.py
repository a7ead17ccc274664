"""lmtier.config: the shipped YAML files, sizes, env overrides and every validation error."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmtier.config import (
    GB,
    MB,
    DiskTierSpec,
    MemoryTierSpec,
    StoreConfig,
    TierConfig,
    apply_env_overrides,
    load_config,
    parse_config,
)
from lmtier.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _base() -> dict[str, Any]:
    return {
        "tiers": [
            {"name": "cpu", "kind": "memory", "device": "cpu", "max_size_gb": 1},
            {"name": "disk", "kind": "disk", "path": "/tmp/lmtier-test", "max_size_mb": 64},
        ]
    }


def _write(tmp_path: Path, data: object, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# --- shipped configs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        (
            "default.yaml",
            [
                ("gpu", "memory", "cuda", 2 * GB),
                ("cpu", "memory", "cpu", 8 * GB),
                ("disk", "disk", "/var/tmp/lmtier", 50 * GB),
            ],
        ),
        (
            "cpu_disk.yaml",
            [
                ("cpu", "memory", "cpu", 8 * GB),
                ("disk", "disk", "/var/tmp/lmtier", 50 * GB),
            ],
        ),
    ],
)
def test_shipped_configs_load(filename: str, expected: list[tuple[Any, ...]]) -> None:
    config = load_config(CONFIGS / filename, environ={})
    got = [
        (t.name, t.kind, t.device if isinstance(t, MemoryTierSpec) else t.path, t.max_size_bytes)
        for t in config.tiers
        if isinstance(t, MemoryTierSpec | DiskTierSpec)
    ]
    assert got == expected
    assert config.promote_on_hit is True
    assert config.room_timeout_s == 30.0
    for tier in config.tiers:
        assert tier.required is False
        if isinstance(tier, DiskTierSpec):
            assert (tier.durability, tier.mode, tier.auth_key) == ("none", 0o600, None)
        else:
            assert isinstance(tier, MemoryTierSpec) and tier.pinned is True


# The measured default (docs/policies.md, "The default evictor"): change it only with new
# measurements there.
SHIPPED_EVICTORS = {
    "default.yaml": ["lru", "lru", "prefix"],
    "cpu_disk.yaml": ["lru", "prefix"],
    "cpu_disk_redis.yaml": ["lru", "lru", "prefix"],
    "vllm.yaml": ["prefix"],
    "vllm_redis.yaml": ["lru", "prefix"],
    "sglang.yaml": ["prefix"],
    "sglang_redis.yaml": ["lru", "prefix"],
}


@pytest.mark.parametrize("filename", sorted(SHIPPED_EVICTORS))
def test_shipped_configs_evict_by_lru_above_a_prefix_last_tier(filename: str) -> None:
    config = load_config(CONFIGS / filename, environ={})
    assert [tier.evictor for tier in config.tiers] == SHIPPED_EVICTORS[filename]


def test_every_shipped_config_has_its_evictors_pinned() -> None:
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(SHIPPED_EVICTORS)


def test_defaults_and_types() -> None:
    config = parse_config(_base())
    cpu, disk = config.tiers
    assert isinstance(config, StoreConfig)
    assert isinstance(config.tiers, tuple)
    assert isinstance(cpu, TierConfig) and isinstance(cpu, MemoryTierSpec)
    assert isinstance(disk, DiskTierSpec)
    assert (cpu.evictor, cpu.device, cpu.pinned, cpu.required) == ("lru", "cpu", True, False)
    assert (disk.durability, disk.mode, disk.folder_mode) == ("none", 0o600, 0o700)
    assert isinstance(config.room_timeout_s, float)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("max_size_gb", 2, 2 * GB),
        ("max_size_gb", 0.5, GB // 2),
        ("max_size_mb", 64, 64 * MB),
        ("max_size_mb", 1.5, 3 * MB // 2),
    ],
)
def test_sizes(key: str, value: float, expected: int) -> None:
    data = _base()
    del data["tiers"][0]["max_size_gb"]
    data["tiers"][0][key] = value
    tier = parse_config(data).tiers[0]
    assert tier.max_size_bytes == expected
    assert isinstance(tier.max_size_bytes, int)
    assert tier.max_size_gb == expected / GB


# ids avoid a bare "cuda", which conftest would read as the cuda marker and skip.
@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:3"], ids=lambda d: f"device={d}")
def test_devices_accepted_without_checking_cuda(device: str) -> None:
    data = _base()
    data["tiers"][0]["device"] = device
    assert parse_config(data).tiers[0].device == device


def test_disk_path_expands_user() -> None:
    data = _base()
    data["tiers"][1]["path"] = "~/lmtier"
    assert parse_config(data).tiers[1].path == os.path.expanduser("~/lmtier")


def test_dataclasses_are_frozen() -> None:
    config = parse_config(_base())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.promote_on_hit = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tiers[0].max_size_bytes = 1  # type: ignore[misc]


# --- loading and environment overrides ---------------------------------------------------------


def test_env_overrides_are_typed(tmp_path: Path) -> None:
    path = _write(tmp_path, _base())
    environ = {
        "LMTIER_PROMOTE_ON_HIT": "false",
        "LMTIER_ROOM_TIMEOUT_S": "5",
        "LMTIER_CPU__MAX_SIZE_GB": "16",
        "LMTIER_CPU__PINNED": "false",
        "LMTIER_DISK__PATH": "/mnt/x",
        "LMTIER_DISK__DURABILITY": "fsync",
        "HOME_IS_NOT_OURS": "ignored",
    }
    config = load_config(path, environ=environ)
    cpu, disk = config.tiers
    assert config.promote_on_hit is False
    assert config.room_timeout_s == 5.0
    assert cpu.max_size_bytes == 16 * GB
    assert cpu.pinned is False
    assert disk.path == "/mnt/x"
    assert disk.durability == "fsync"


def test_env_tier_name_is_case_insensitive() -> None:
    data = _base()
    data["tiers"][0]["name"] = "Cpu"
    out = apply_env_overrides(data, {"LMTIER_CPU__EVICTOR": "lru", "lmtier_cpu__pinned": "no"})
    assert out["tiers"][0]["evictor"] == "lru"
    assert "pinned" not in out["tiers"][0]  # the prefix itself is case-sensitive


def test_env_size_unit_replaces_the_other() -> None:
    out = apply_env_overrides(_base(), {"LMTIER_DISK__MAX_SIZE_GB": "3"})
    disk = out["tiers"][1]
    assert disk["max_size_gb"] == 3
    assert "max_size_mb" not in disk
    assert parse_config(out).tiers[1].max_size_bytes == 3 * GB


def test_env_string_fields_stay_verbatim() -> None:
    out = apply_env_overrides(_base(), {"LMTIER_DISK__PATH": "null", "LMTIER_CPU__NAME": "123"})
    assert out["tiers"][1]["path"] == "null"
    assert out["tiers"][0]["name"] == "123"


def test_apply_env_overrides_leaves_input_unchanged() -> None:
    data = _base()
    before = copy.deepcopy(data)
    out = apply_env_overrides(data, {"LMTIER_CPU__MAX_SIZE_MB": "7", "LMTIER_PROMOTE_ON_HIT": "0"})
    assert data == before
    assert out is not data
    assert out["tiers"][0] == {"name": "cpu", "kind": "memory", "device": "cpu", "max_size_mb": 7}


def test_lmtier_config_used_when_path_is_none(tmp_path: Path) -> None:
    path = _write(tmp_path, _base())
    config = load_config(environ={"LMTIER_CONFIG": str(path), "LMTIER_CPU__MAX_SIZE_MB": "8"})
    assert config.tiers[0].max_size_bytes == 8 * MB


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"LMTIER_BOGUS": "1"}, "LMTIER_BOGUS"),
        ({"LMTIER_TIERS": "[]"}, "LMTIER_TIERS"),
        ({"LMTIER_NVME__PATH": "/x"}, "LMTIER_NVME__PATH"),
        ({"LMTIER_CPU__COLOUR": "red"}, "LMTIER_CPU__COLOUR"),
        ({"LMTIER_CPU__PINNED": "["}, "LMTIER_CPU__PINNED"),
        ({"LMTIER_CPU__MAX_SIZE_GB": "1", "LMTIER_CPU__MAX_SIZE_MB": "1"}, "LMTIER_CPU__MAX_SIZE"),
    ],
)
def test_bad_env_overrides(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        apply_env_overrides(_base(), environ)


def test_no_config_given() -> None:
    with pytest.raises(ConfigError, match="LMTIER_CONFIG"):
        load_config(environ={})


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(missing, environ={})


def test_malformed_yaml_names_file_and_chains(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("tiers: [\n  - {name: cpu\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml") as info:
        load_config(path, environ={})
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"empty\.yaml.*mapping"):
        load_config(path, environ={})


# --- validation --------------------------------------------------------------------------------


_DROP = object()


def _tier(index: int, **changes: Any) -> dict[str, Any]:
    """The base config with tier ``index`` changed; a value of ``_DROP`` removes the key."""
    data = _base()
    for key, value in changes.items():
        if value is _DROP:
            data["tiers"][index].pop(key)
        else:
            data["tiers"][index][key] = value
    return data


INVALID: list[tuple[str, object, str]] = [
    ("top level is a list", [1], "mapping"),
    ("top level is None", None, "mapping"),
    ("unknown top-level key", {**_base(), "colour": 1}, "colour"),
    ("tiers missing", {}, "tiers"),
    ("tiers empty", {"tiers": []}, "tiers"),
    ("tiers not a list", {"tiers": {"name": "cpu"}}, "tiers"),
    ("tier not a mapping", {"tiers": ["cpu"]}, r"tiers\[0\]"),
    ("unknown tier key", _tier(0, colour="red"), "colour"),
    ("missing name", _tier(0, name=_DROP), "name"),
    ("empty name", _tier(0, name=""), "name"),
    ("name not str", _tier(0, name=3), "name"),
    ("missing kind", _tier(0, kind=_DROP), "kind"),
    ("unknown kind", _tier(0, kind="tape"), "kind.*tape.*known: disk, memory"),
    ("missing size", _tier(0, max_size_gb=_DROP), "max_size_gb"),
    ("both sizes", _tier(0, max_size_mb=5), "max_size_mb"),
    ("size is bool", _tier(0, max_size_gb=True), "max_size_gb.*number"),
    ("size is str", _tier(0, max_size_gb="8"), "max_size_gb.*number"),
    ("size zero", _tier(0, max_size_gb=0), "max_size_gb"),
    ("size negative", _tier(1, max_size_mb=-1), "max_size_mb"),
    ("size rounds to zero", _tier(0, max_size_gb=1e-12), "max_size_gb"),
    ("size infinite", _tier(0, max_size_gb=float("inf")), "max_size_gb"),
    ("pinned is number", _tier(0, pinned=1), "pinned.*true or false"),
    ("required is str", _tier(0, required="yes"), "required"),
    ("unknown evictor", _tier(0, evictor="mru"), "evictor.*mru.*known: .*lru"),
    ("malformed device", _tier(0, device="cuda:x"), "device"),
    ("non cpu/cuda device", _tier(0, device="meta"), "device"),
    ("indexed cpu device", _tier(0, device="cpu:0"), "device"),
    ("device not str", _tier(0, device=0), "device"),
    ("disk without path", _tier(1, path=_DROP), "path"),
    ("disk with empty path", _tier(1, path=" "), "path"),
    ("memory with path", _tier(0, path="/tmp/x"), "path"),
    ("disk with device", _tier(1, device="cpu"), "device"),
    ("disk with pinned", _tier(1, pinned=False), "pinned"),
    ("memory with durability", _tier(0, durability="none"), "durability"),
    ("bad durability", _tier(1, durability="always"), "durability.*fsync"),
    ("duplicate names", _tier(1, name="CPU"), r"tiers\[1\].*name.*duplicates"),
    ("promote_on_hit not bool", {**_base(), "promote_on_hit": "yes"}, "promote_on_hit"),
    ("clean_copies not bool", {**_base(), "clean_copies": 1}, "clean_copies"),
    ("write_ahead not bool", {**_base(), "write_ahead": "yes"}, "write_ahead"),
    (
        "write_ahead without clean copies",
        {**_base(), "write_ahead": True, "clean_copies": False},
        "needs 'clean_copies'",
    ),
    ("room timeout zero", {**_base(), "room_timeout_s": 0}, "room_timeout_s"),
    ("room timeout negative", {**_base(), "room_timeout_s": -1.5}, "room_timeout_s"),
    ("room timeout nan", {**_base(), "room_timeout_s": float("nan")}, "room_timeout_s"),
    ("room timeout bool", {**_base(), "room_timeout_s": True}, "room_timeout_s"),
]


@pytest.mark.parametrize(("data", "needle"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_configs(data: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        parse_config(data, source="my.yaml")
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("my.yaml")


def test_tier_errors_name_the_tier() -> None:
    with pytest.raises(ConfigError, match=r"tiers\[1\] \('disk'\).*durability"):
        parse_config(_tier(1, durability="sometimes"))
    with pytest.raises(ConfigError, match=r"tiers\[0\]: missing required field 'name'"):
        parse_config(_tier(0, name=_DROP))


def test_validation_errors_from_file_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _tier(0, evictor="nope"), name="bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: tiers\[0\] \('cpu'\).*evictor"):
        load_config(path, environ={})


def test_reserved_variables_are_not_overrides_and_set_the_log_level() -> None:
    import logging
    import subprocess
    import sys

    from lmtier.config import config_from_mapping

    data = {"tiers": [{"name": "cpu", "kind": "memory", "max_size_gb": 0.001}]}
    config = config_from_mapping(data, environ={"LMTIER_LOG_LEVEL": "DEBUG"})
    assert config.tiers[0].name == "cpu"
    code = "import logging, lmtier; print(logging.getLogger('lmtier').level)"
    env = {"LMTIER_LOG_LEVEL": "debug", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == str(logging.DEBUG)


def test_an_unknown_variable_names_every_top_level_field() -> None:
    from lmtier.config import config_from_mapping

    data = {"tiers": [{"name": "cpu", "kind": "memory", "max_size_gb": 0.001}]}
    fields = (
        "clean_copies, metrics, namespace, promote_on_hit, report_interval_s, room_timeout_s, "
        "write_ahead"
    )
    with pytest.raises(ConfigError, match=fields):
        config_from_mapping(data, environ={"LMTIER_NOPE": "1"})


def test_a_bad_value_from_the_environment_is_blamed_on_the_environment() -> None:
    from lmtier.config import config_from_mapping

    data = {"tiers": [{"name": "cpu", "kind": "memory", "max_size_gb": 0.001}]}
    with pytest.raises(ConfigError, match="a value set by LMTIER_ROOM_TIMEOUT_S"):
        config_from_mapping(data, "store.yaml", environ={"LMTIER_ROOM_TIMEOUT_S": "-1"})
    bad = {**data, "room_timeout_s": -1}
    with pytest.raises(ConfigError) as raised:
        config_from_mapping(bad, "store.yaml", environ={"LMTIER_NAMESPACE": "x"})
    assert "a value set by" not in str(raised.value)
