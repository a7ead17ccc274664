"""The engine integrations' store config: the user's, prefix for tiers that name no evictor.

The vLLM and SGLang modules need their engines to import; what they do with a config is here,
engine-free, plus a check that both build their config through it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from lmtier.config import CONFIG_ENV, StoreConfig, TierConfig, load_config, parse_config
from lmtier.errors import ConfigError
from lmtier.integrations.engine_config import ENGINE_EVICTOR, engine_config

INTEGRATIONS = Path(__file__).resolve().parent.parent / "lmtier" / "integrations"
CONFIG = {
    "tiers": [
        {"name": "cpu", "kind": "memory", "max_size_mb": 64},
        {"name": "disk", "kind": "disk", "path": "/tmp/lmtier-engine", "max_size_mb": 64,
         "evictor": "lru"},
    ]
}  # fmt: skip


def evictors(config: StoreConfig) -> list[str]:
    return [tier.evictor for tier in config.tiers]


def test_the_engines_default_evictor_is_prefix_and_the_librarys_stays_lru() -> None:
    assert ENGINE_EVICTOR == "prefix"
    assert TierConfig.evictor == "lru"
    assert evictors(parse_config(CONFIG)) == ["lru", "lru"]


def test_tiers_naming_no_evictor_get_prefix_from_a_mapping_a_file_or_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LMTIER_CPU__EVICTOR", raising=False)
    assert evictors(engine_config(None, CONFIG, "config")) == ["prefix", "lru"]
    assert evictors(engine_config(None, CONFIG, "config", env_overrides=False)) == [
        "prefix",
        "lru",
    ]
    path = tmp_path / "lmtier.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert evictors(engine_config(path, None, "unused")) == ["prefix", "lru"]
    assert evictors(load_config(path, environ={})) == ["lru", "lru"]  # the library's reading
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert evictors(engine_config(None, None, "unused")) == ["prefix", "lru"]


def test_an_env_override_names_the_evictor_where_overrides_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LMTIER_CPU__EVICTOR", "s3fifo")
    assert evictors(engine_config(None, CONFIG, "config")) == ["s3fifo", "lru"]
    assert evictors(engine_config(None, CONFIG, "config", env_overrides=False)) == [
        "prefix",
        "lru",
    ]


def test_a_bad_default_evictor_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="default evictor 'mru' is unknown; known: arc"):
        parse_config(CONFIG, default_evictor="mru")


@pytest.mark.parametrize("module", ["vllm.py", "sglang.py"])
def test_each_integration_builds_its_config_through_engine_config(module: str) -> None:
    tree = ast.parse((INTEGRATIONS / module).read_text())
    called = {
        node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert "engine_config" in called
    assert not called & {"load_config", "parse_config", "config_from_mapping"}
