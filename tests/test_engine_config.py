"""The engine integrations' store config: the user's, prefix on a last tier that names none.

The vLLM and SGLang modules need their engines to import; what they do with a config is here,
engine-free, plus a check that both build their config through it.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmtier.config import CONFIG_ENV, StoreConfig, TierConfig, load_config, parse_config
from lmtier.errors import ConfigError
from lmtier.integrations.engine_config import ENGINE_EVICTOR, engine_config

INTEGRATIONS = Path(__file__).resolve().parent.parent / "lmtier" / "integrations"


def config(*evictors: str | None) -> dict[str, Any]:
    """Memory tiers over a disk tier, each with the evictor given (None: names none)."""
    tiers: list[dict[str, Any]] = [
        {"name": f"mem{i}", "kind": "memory", "max_size_mb": 64} for i in range(len(evictors) - 1)
    ]
    tiers.append({"name": "disk", "kind": "disk", "path": "/tmp/lmtier-e", "max_size_mb": 64})
    for tier, evictor in zip(tiers, evictors, strict=True):
        if evictor is not None:
            tier["evictor"] = evictor
    return {"tiers": tiers}


def evictors(store_config: StoreConfig) -> list[str]:
    return [tier.evictor for tier in store_config.tiers]


def test_the_engines_last_tier_gets_prefix_and_the_librarys_default_stays_lru() -> None:
    assert ENGINE_EVICTOR == "prefix"
    assert TierConfig.evictor == "lru"
    assert evictors(parse_config(config(None, None))) == ["lru", "lru"]
    assert evictors(engine_config(None, config(None), "c", env_overrides=False)) == ["prefix"]
    for overrides in (True, False):
        got = engine_config(None, config(None, None, None), "c", env_overrides=overrides)
        assert evictors(got) == ["lru", "lru", "prefix"]
        named = engine_config(None, config("s3fifo", "fifo"), "c", env_overrides=overrides)
        assert evictors(named) == ["s3fifo", "fifo"]  # a tier that names one keeps it


def test_a_file_or_lmtier_config_gets_the_same_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lmtier.yaml"
    path.write_text(yaml.safe_dump(config(None, None)))
    assert evictors(engine_config(path, None, "unused")) == ["lru", "prefix"]
    assert evictors(load_config(path, environ={})) == ["lru", "lru"]  # the library's reading
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert evictors(engine_config(None, None, "unused")) == ["lru", "prefix"]


def test_an_env_override_names_the_evictor_where_overrides_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LMTIER_DISK__EVICTOR", "s3fifo")
    assert evictors(engine_config(None, config(None, None), "c")) == ["lru", "s3fifo"]
    unapplied = engine_config(None, config(None, None), "c", env_overrides=False)
    assert evictors(unapplied) == ["lru", "prefix"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tiers": []}, "non-empty list"),
        ({"tiers": ["disk"]}, r"tiers\[0\] must be a mapping"),
        ({"tiers": [{**config(None)["tiers"][0], "evictor": "mru"}]}, "unknown value 'mru'"),
        (["tiers"], "top level must be a mapping"),
    ],
)
def test_a_bad_config_gets_the_parsers_error(data: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        engine_config(None, data, "c")


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_each_integration_builds_its_config_through_engine_config(engine: str) -> None:
    """The integration's modules (``vllm.py`` and its ``vllm_*.py`` parts) build their store
    config through engine_config, never by parsing one of their own."""
    modules = [INTEGRATIONS / f"{engine}.py", *INTEGRATIONS.glob(f"{engine}_*.py")]
    called = {
        node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        for module in modules
        for node in ast.walk(ast.parse(module.read_text()))
        if isinstance(node, ast.Call)
    }
    assert "engine_config" in called
    assert not called & {"load_config", "parse_config", "config_from_mapping", "read_config_file"}


def test_in_namespace_puts_the_namespace_beneath_a_configured_key_prefix() -> None:
    from lmtier.integrations.engine_config import in_namespace

    redis = {"kind": "redis", "url": "redis://127.0.0.1:1", "max_size_mb": 64}
    base = parse_config(
        {
            "namespace": "user",
            "tiers": [
                {"name": "a", **redis, "key_prefix": "team"},
                {"name": "b", **redis},
            ],
        },
        "c",
    )
    one, two = in_namespace(base, "user|model-a"), in_namespace(base, "user|model-b")
    assert (one.namespace, two.namespace) == ("user|model-a", "user|model-b")
    prefix_one, prefix_two = one.tiers[0].key_prefix, two.tiers[0].key_prefix
    assert prefix_one is not None and prefix_two is not None
    assert prefix_one.startswith("team:") and prefix_two.startswith("team:")
    assert prefix_one != prefix_two
    assert in_namespace(base, "user|model-a").tiers[0].key_prefix == prefix_one  # stable
    assert one.tiers[1].key_prefix is None  # derived from the namespace by the tier itself
