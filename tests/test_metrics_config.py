"""The ``metrics`` section of a config: validated like every other field, overridable from the
environment as a whole section, with errors that say what to write instead."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmtier import TieredStore
from lmtier.config import MetricsConfig, config_from_mapping, load_config
from lmtier.errors import ConfigError


def base(**top: Any) -> dict[str, Any]:
    return {"tiers": [{"name": "cpu", "kind": "memory", "max_size_mb": 8}], **top}


def test_a_yaml_file_sets_the_port_and_the_host(tmp_path: Path) -> None:
    served, plain = tmp_path / "served.yaml", tmp_path / "plain.yaml"
    served.write_text(yaml.safe_dump(base(metrics={"port": 9400, "host": "127.0.0.1"})))
    plain.write_text(yaml.safe_dump(base()))
    assert load_config(served, environ={}).metrics == MetricsConfig(9400, "127.0.0.1")
    assert load_config(plain, environ={}).metrics is None  # no section: no server


def test_port_zero_and_the_default_host() -> None:
    config = config_from_mapping(base(metrics={"port": 0}), environ={})
    assert config.metrics == MetricsConfig(port=0, host="127.0.0.1")
    every = config_from_mapping(base(metrics={"port": 0, "host": "0.0.0.0"}), environ={})
    assert every.metrics == MetricsConfig(port=0, host="0.0.0.0")
    # a section without a port: histograms, and no server
    assert config_from_mapping(base(metrics={}), environ={}).metrics == MetricsConfig(port=None)
    assert config_from_mapping(base(metrics={"port": None}), environ={}).metrics == MetricsConfig()


@pytest.mark.parametrize("port", [-1, 65536, "9400", True, 9400.0])
def test_a_bad_port_is_a_clear_error(port: object) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_mapping(base(metrics={"port": port}), "c.yaml", environ={})
    message = str(error.value)
    assert message.startswith("c.yaml: metrics: field 'port' must be a whole number from 0 to")
    assert "65535 (0: any free port)" in message and repr(port) in message


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"port": 1, "path": "/metrics"}, "unknown field(s) 'path'; known: host, port"),
        (9400, "must be a mapping such as {port: 9400}, got int 9400"),
        ({"port": 1, "host": " "}, "field 'host' must not be empty"),
        ({"port": 1, "host": 7}, "field 'host' must be a string"),
    ],
)
def test_a_bad_section_is_a_clear_error(section: object, words: str) -> None:
    with pytest.raises(ConfigError, match="metrics") as error:
        config_from_mapping(base(metrics=section), environ={})
    assert words in str(error.value)


async def test_the_server_binds_loopback_unless_the_host_says_otherwise() -> None:
    config = config_from_mapping(base(metrics={"port": 0}), environ={})
    async with TieredStore(config) as store:
        assert store.metrics.address == ("127.0.0.1", store.metrics_port)
        with socket.create_connection(("127.0.0.1", store.metrics_port or 0), timeout=30):
            pass
    wide = config_from_mapping(base(metrics={"port": 0, "host": "0.0.0.0"}), environ={})
    async with TieredStore(wide) as store:
        assert store.metrics.address == ("0.0.0.0", store.metrics_port)


def test_the_environment_sets_the_whole_section() -> None:
    environ = {"LMTIER_METRICS": "{port: 9401, host: 127.0.0.1}"}
    config = config_from_mapping(base(metrics={"port": 9400}), environ=environ)
    assert config.metrics == MetricsConfig(9401, "127.0.0.1")


def test_a_bad_value_from_the_environment_is_blamed_on_its_variable() -> None:
    with pytest.raises(ConfigError, match=r"from 0 to 65535.*a value set by LMTIER_METRICS\)"):
        config_from_mapping(base(), environ={"LMTIER_METRICS": "{port: 70000}"})


def test_a_nested_variable_says_how_to_set_the_section() -> None:
    with pytest.raises(ConfigError) as error:
        config_from_mapping(base(), environ={"LMTIER_METRICS__PORT": "9400"})
    assert "no tier named 'metrics'" in str(error.value)
    assert "LMTIER_METRICS='{port: 9400}'" in str(error.value)
