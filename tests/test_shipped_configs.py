"""Every file in configs/ loads and builds a store; every config the docs name is one of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmtier import PutStatus, TieredStore
from lmtier.config import load_config
from lmtier.integrations.engine_config import engine_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
ENGINE_CONFIGS = ["vllm.yaml", "vllm_redis.yaml", "sglang.yaml", "sglang_redis.yaml"]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _named_in_docs() -> set[str]:
    named: set[str] = set()
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        named.update(re.findall(r"configs/[\w.-]+\.ya?ml", text))
        named.update(re.findall(r'"config_path": "([^"]+)"', text))
    return named


def _isolated(tmp_path: Path) -> dict[str, str]:
    """Overrides that keep a shipped config's folders inside the test's own."""
    return {"LMTIER_DISK__PATH": str(tmp_path / "disk"), "LMTIER_DISK__MAX_SIZE_MB": "4"}


def test_the_engine_configs_are_shipped() -> None:
    assert {path.name for path in CONFIGS} >= set(ENGINE_CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_loads_and_builds(path: Path, tmp_path: Path) -> None:
    config = load_config(path, environ=_isolated(tmp_path))
    store = TieredStore(config)
    usable = [
        t.name
        for t in config.tiers
        if getattr(t, "device", "cpu") == "cpu" or torch.cuda.is_available()
    ]
    assert [tier.name for tier in store.tiers] == usable
    assert not (tmp_path / "disk").exists(), "building a store writes nothing"


@pytest.mark.parametrize("name", ENGINE_CONFIGS)
def test_engine_configs_sit_below_the_engines_cpu_tier(name: str) -> None:
    """No memory tier: the engine's own CPU tier or host pool is above lmtier."""
    config = engine_config(REPO / "configs" / name, None, name, env_overrides=False)
    assert config.tiers[0].kind == "disk"
    assert all(tier.kind != "memory" for tier in config.tiers)
    assert "docs/sizing.md" in (REPO / "configs" / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["vllm.yaml", "sglang.yaml"])
async def test_the_disk_only_engine_configs_store_and_read_back(name: str, tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / name, environ=_isolated(tmp_path))
    kv = torch.arange(4096, dtype=torch.float32).reshape(2, 2048)
    async with TieredStore(config) as store:
        assert await store.put("block-0", kv) is PutStatus.LEGAL
        assert await store.contains("block-0") == "disk"
        got = await store.get("block-0")
        assert got is not None and torch.equal(got, kv)


def test_every_config_the_docs_name_exists_and_builds(tmp_path: Path) -> None:
    named = _named_in_docs()
    assert {f"configs/{name}" for name in ENGINE_CONFIGS} <= named
    for relative in sorted(named):
        path = REPO / relative
        assert path.is_file(), f"the docs name {relative}, which does not exist"
        assert TieredStore(load_config(path, environ=_isolated(tmp_path))).tiers
