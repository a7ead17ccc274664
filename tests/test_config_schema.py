"""The config schema is written once, in the specs' fields: strict YAML (no duplicate keys),
finite numbers in every float field, the kind registry, and the docs table from the fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml

from lmtier.config import (
    StoreConfig,
    TierSpec,
    apply_env_overrides,
    config_from_mapping,
    load_config,
    read_config_file,
    register_tier_kind,
    spec_class,
    tier_kinds,
    tier_specs,
)
from lmtier.config.docs import store_keys_table, tier_keys_table
from lmtier.config.fields import flag, setting
from lmtier.errors import ConfigError
from lmtier.evictor import BaseEvictor
from lmtier.tiers import factory
from lmtier.tiers.memory import MemoryTier

REPO = Path(__file__).resolve().parent.parent
TIERS = """\
tiers:
  - name: cpu
    kind: memory
    max_size_mb: 8
  - name: remote
    kind: redis
    url: redis://cache:6379
    max_size_mb: 8
"""


def _load(tmp_path: Path, text: str) -> StoreConfig:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path, environ={})


# --- duplicate keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("room_timeout_s: 5\n" + TIERS + "room_timeout_s: 9\n", "line 10: duplicate key "
         "'room_timeout_s' (first at line 1)"),
        (TIERS + "    max_size_mb: 16\n", "line 9: duplicate key 'max_size_mb' (first at line 8)"),
        ("tiers: [{name: a, kind: memory, max_size_mb: 1, name: b}]\n",
         "line 1: duplicate key 'name' (first at line 1)"),
        (TIERS.replace("tiers:", "tiers:\n  - {}\ntiers:", 1), "duplicate key 'tiers'"),
    ],
)  # fmt: skip
def test_a_duplicate_key_is_refused_naming_it_and_its_line(
    tmp_path: Path, text: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, text)
    assert str(raised.value).startswith(f"{tmp_path / 'c.yaml'}: line ")
    assert needle in str(raised.value)


def test_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    text = (
        "base: &base {kind: memory, max_size_mb: 8}\n"
        "tiers:\n  - {<<: *base, name: cpu, max_size_mb: 16}\n"
    )
    path = tmp_path / "c.yaml"
    path.write_text(text)
    data, _ = read_config_file(path, environ={})
    assert data["tiers"][0]["max_size_mb"] == 16


def test_a_duplicate_key_in_an_env_value_is_refused() -> None:
    data = {"tiers": [{"name": "cpu", "kind": "memory", "max_size_mb": 8}]}
    with pytest.raises(ConfigError, match=r"LMTIER_METRICS.*duplicate key 'port'"):
        apply_env_overrides(data, {"LMTIER_METRICS": "{port: 1, port: 2}"})


# --- finite numbers ------------------------------------------------------------------------


def _float_keys() -> list[tuple[str, str]]:
    """(kind or "top", key) for every float field of the config, and both size units."""
    found = [("top", f.name) for f in dataclasses.fields(StoreConfig) if f.type == "float"]
    for kind in tier_kinds():
        for f in dataclasses.fields(spec_class(kind)):
            if f.type == "float" and (kind, f.name) not in found:
                found.append((kind, f.name))
    return [*found, ("memory", "max_size_gb"), ("memory", "max_size_mb")]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN", "+.Inf"])
@pytest.mark.parametrize(("kind", "key"), _float_keys())
def test_every_float_field_refuses_infinity_and_nan(kind: str, key: str, value: str) -> None:
    data = yaml.safe_load(TIERS)
    number = yaml.safe_load(value)
    if kind == "top":
        data[key] = number
    else:
        tier = next(t for t in data["tiers"] if t["kind"] == kind)
        if key.startswith("max_size_"):
            del tier["max_size_mb"]
        tier[key] = number
    with pytest.raises(ConfigError, match=f"field '{key}' must be") as raised:
        config_from_mapping(data, "c.yaml", environ={})
    assert "finite" in str(raised.value)


def test_the_float_fields_found_include_the_timeouts() -> None:
    keys = _float_keys()
    assert ("top", "room_timeout_s") in keys
    assert {("redis", k) for k in ("connect_timeout_s", "op_timeout_s", "reconnect_max_s")} <= set(
        keys
    )


def test_room_timeout_inf_in_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'room_timeout_s' must be a finite number, got inf"):
        _load(tmp_path, "room_timeout_s: .inf\n" + TIERS)


# --- the kind registry ---------------------------------------------------------------------


def test_a_new_kind_is_parsed_and_built_through_the_registries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tier_specs, "_KINDS", dict(tier_specs._KINDS))
    monkeypatch.setattr(factory, "_BUILDERS", dict(factory._BUILDERS))

    @register_tier_kind
    @dataclasses.dataclass(frozen=True, repr=False, kw_only=True)
    class ScratchTierSpec(TierSpec):
        KIND: ClassVar[str] = "scratch"
        zeroed: bool = setting("zero the memory first", flag, False)

    built: list[Any] = []

    def build(spec: ScratchTierSpec, evictor: BaseEvictor, namespace: str) -> MemoryTier:
        built.append((spec.zeroed, namespace))
        return MemoryTier(spec.name, evictor, torch.device("cpu"), pinned=False)

    factory.register_tier_builder(ScratchTierSpec, build)
    data = {"tiers": [{"name": "s", "kind": "scratch", "max_size_mb": 1, "zeroed": True}]}
    spec = config_from_mapping(data, environ={"LMTIER_S__ZEROED": "false"}).tiers[0]
    assert isinstance(spec, ScratchTierSpec) and spec.zeroed is False
    assert TierSpec("t", "scratch", 1, zeroed=True) == ScratchTierSpec(
        "t", "scratch", 1, zeroed=True
    )
    tier = factory.build_tier(spec, "ns")
    assert isinstance(tier, MemoryTier) and built == [(False, "ns")]
    with pytest.raises(ConfigError, match="already registered"):
        register_tier_kind(ScratchTierSpec)
    other = {"tiers": [{"name": "m", "kind": "memory", "max_size_mb": 1, "zeroed": True}]}
    with pytest.raises(ConfigError, match="'zeroed' is for scratch tiers; a memory tier may not"):
        config_from_mapping(other, environ={})


def test_the_base_builds_the_spec_of_its_kind() -> None:
    spec = TierSpec("d", "disk", 1024, path="/tmp/x")
    assert type(spec) is spec_class("disk") and spec.path == "/tmp/x"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="unknown tier kind 'tape'"):
        TierSpec("t", "tape", 1)
    with pytest.raises(ConfigError, match="has kind 'memory'"):
        spec_class("memory")("m", "disk", 1)
    with pytest.raises(TypeError):
        TierSpec("m", "memory", 1, path="/tmp/x")  # a disk field on a memory tier


@pytest.mark.parametrize("kind", tier_kinds())
def test_each_field_of_another_kind_is_refused_by_name(kind: str) -> None:
    mine = {key for f in dataclasses.fields(spec_class(kind)) for key in _keys(f)}
    for other in tier_kinds():
        for f in dataclasses.fields(spec_class(other)):
            for key in set(_keys(f)) - mine:
                data = {"tiers": [{"name": "t", "kind": kind, "max_size_mb": 1, key: None}]}
                with pytest.raises(ConfigError, match=f"'{key}' is for .*{other}.* a {kind} tier"):
                    config_from_mapping(data, environ={})


def _keys(field: dataclasses.Field[Any]) -> tuple[str, ...]:
    from lmtier.config.fields import yaml_keys

    return yaml_keys(field)


# --- the docs ------------------------------------------------------------------------------


def test_the_docs_table_is_the_one_the_fields_give() -> None:
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert tier_keys_table() in page, "regenerate it: python -m lmtier.config.docs"
    assert store_keys_table() in page, "regenerate it: python -m lmtier.config.docs"


def test_every_top_level_key_is_in_the_docs_table() -> None:
    from lmtier.config.store_config import top_level_keys

    table = store_keys_table()
    for key in top_level_keys():
        assert key == "tiers" or f"`{key}`" in table


@pytest.mark.parametrize("value", [-1, True, "60"])
def test_a_report_interval_is_seconds_or_zero(value: Any) -> None:
    data: dict[str, Any] = {"tiers": [{"name": "m", "kind": "memory", "max_size_mb": 1}]}
    assert config_from_mapping(data, environ={}).report_interval_s == 60
    assert config_from_mapping({**data, "report_interval_s": 0}, environ={}).report_interval_s == 0
    with pytest.raises(ConfigError, match="'report_interval_s' must be a number"):
        config_from_mapping({**data, "report_interval_s": value}, environ={})


def test_every_key_of_the_docs_table_is_a_key_the_parser_takes() -> None:
    table = tier_keys_table()
    from lmtier.config.store_config import tier_keys

    for key in tier_keys():
        assert f"`{key}`" in table
