"""Config of the redis tier: fields, validation, env overrides, and the optional extra."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from lmtier.config import load_config, parse_config
from lmtier.errors import ConfigError
from lmtier.tiers.factory import build_tier

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _config(**remote: Any) -> dict[str, Any]:
    tier = {"name": "remote", "kind": "redis", "url": "redis://cache:6379", "max_size_gb": 4}
    return {"tiers": [{"name": "cpu", "kind": "memory", "max_size_gb": 1}, {**tier, **remote}]}


def test_a_redis_tier_with_every_field() -> None:
    config = parse_config(
        _config(
            url="rediss://cache.internal:6380/0", username="lm", password="s3cret",
            key_prefix="kv", connect_timeout_s=1, op_timeout_s=0.25, reconnect_max_s=30,
            cluster=True, evictor="lru",
        )
    )  # fmt: skip
    tier = config.tiers[1]
    assert (tier.kind, tier.url, tier.username, tier.key_prefix, tier.cluster) == (
        "redis", "rediss://cache.internal:6380/0", "lm", "kv", True,
    )  # fmt: skip
    assert (tier.connect_timeout_s, tier.op_timeout_s, tier.reconnect_max_s) == (1.0, 0.25, 30.0)
    assert tier.password == "s3cret" and "s3cret" not in repr(tier)


def test_defaults() -> None:
    tier = parse_config(_config()).tiers[1]
    assert (tier.key_prefix, tier.cluster, tier.password, tier.op_timeout_s) == (
        None, False, None, 2.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"url": None}, "missing required field 'url'"),
        ({"url": "http://cache:6379"}, "url.*redis://"),
        ({"url": "redis://"}, "url.*redis://"),
        ({"url": "redis://cache:port"}, "url.*not a URL"),
        ({"op_timeout_s": 0}, "op_timeout_s.*> 0"),
        ({"connect_timeout_s": float("nan")}, "connect_timeout_s"),
        ({"reconnect_max_s": True}, "reconnect_max_s.*number"),
        ({"cluster": "yes"}, "cluster.*true or false"),
        ({"key_prefix": ""}, "key_prefix.*empty"),
        ({"password": 1234}, "password.*string"),
        ({"path": "/tmp/x"}, "'path' is for disk tiers; a redis tier may not set it"),
        ({"device": "cpu"}, "'device' is for memory tiers"),
    ],
)
def test_invalid_redis_fields(fields: dict[str, Any], match: str) -> None:
    data = _config(**fields)
    if fields.get("url", "") is None:
        del data["tiers"][1]["url"]
    with pytest.raises(ConfigError, match=match):
        parse_config(data)


def test_redis_fields_on_another_kind_are_refused() -> None:
    data = _config()
    data["tiers"][0]["url"] = "redis://cache"
    with pytest.raises(ConfigError, match="'url' is for redis tiers; a memory tier may not set it"):
        parse_config(data)


def test_the_example_config_and_env_overrides() -> None:
    environ = {
        "LMTIER_REMOTE__URL": "redis://10.0.0.7:7000",
        "LMTIER_REMOTE__PASSWORD": "null",  # kept verbatim: a password may look like YAML
        "LMTIER_REMOTE__CLUSTER": "true",
    }
    config = load_config(CONFIGS / "cpu_disk_redis.yaml", environ)
    assert [t.kind for t in config.tiers] == ["memory", "disk", "redis"]
    remote = config.tiers[2]
    assert (remote.url, remote.password, remote.cluster) == ("redis://10.0.0.7:7000", "null", True)


def test_without_redis_py_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lmtier.tiers.remote", None)  # import fails as if missing
    spec = parse_config(_config()).tiers[1]
    with pytest.raises(ConfigError, match=r"lmtier\[redis\]"):
        build_tier(spec)
