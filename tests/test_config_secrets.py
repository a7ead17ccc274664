"""Secrets in a config: a redis URL's password, ``password`` and ``auth_key`` never show in a
repr, an error or a log; ``auth_key`` comes from a private file or a set variable; a disk
tier's ``mode``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lmtier import PutStatus, TieredStore
from lmtier.config import DiskTierSpec, RedisTierSpec, config_from_mapping, load_config
from lmtier.errors import ConfigError
from lmtier.secret import Secret
from lmtier.tiers.factory import build_tier

PASSWORD = "pa55-in-the-url"
KEY = "k3y-material-0123456789"


def _config(remote: dict[str, Any] | None = None, disk: dict[str, Any] | None = None) -> dict:
    tiers: list[dict[str, Any]] = [{"name": "cpu", "kind": "memory", "max_size_mb": 8}]
    if disk is not None:
        tiers.append({"name": "disk", "kind": "disk", "path": "/tmp/x", "max_size_mb": 8, **disk})
    if remote is not None:
        url = f"redis://lm:{PASSWORD}@cache:6379/0"
        tiers.append({"name": "remote", "kind": "redis", "url": url, "max_size_mb": 8, **remote})
    return {"tiers": tiers}


def _key_file(tmp_path: Path, mode: int = 0o600, data: bytes = KEY.encode() + b"\n") -> Path:
    path = tmp_path / "key"
    path.write_bytes(data)
    path.chmod(mode)
    return path


# --- a password in a redis URL -------------------------------------------------------------


def test_a_url_password_is_not_in_the_repr_or_str() -> None:
    config = config_from_mapping(_config({"password": "field-secret"}), environ={})
    remote = config.tiers[1]
    assert isinstance(remote, RedisTierSpec) and remote.url.endswith(f"{PASSWORD}@cache:6379/0")
    for shown in (repr(config), str(config), repr(remote), f"{remote}"):
        assert PASSWORD not in shown and "field-secret" not in shown
        assert "redis://lm:***@cache:6379/0" in shown


@pytest.mark.parametrize(
    "url",
    [
        f"http://lm:{PASSWORD}@cache:6379",  # wrong scheme
        f"redis://lm:{PASSWORD}@cache:port",  # a port that is not a number
        f"redis://lm:{PASSWORD}@",  # no host
    ],
)
def test_a_url_password_is_not_in_an_error(url: str) -> None:
    data = _config({})
    data["tiers"][1]["url"] = url
    with pytest.raises(ConfigError, match="url") as raised:
        config_from_mapping(data, "c.yaml", environ={})
    assert PASSWORD not in str(raised.value)


def test_a_url_password_set_by_the_environment_is_not_in_an_error() -> None:
    environ = {"LMTIER_REMOTE__URL": f"ftp://lm:{PASSWORD}@cache"}
    with pytest.raises(ConfigError, match="a value set by LMTIER_REMOTE__URL") as raised:
        config_from_mapping(_config({}), "c.yaml", environ=environ)
    assert PASSWORD not in str(raised.value)


def test_a_malformed_file_quotes_none_of_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"tiers:\n  - {{url: redis://lm:{PASSWORD}@cache, name: [\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: malformed YAML.*line") as raised:
        load_config(path, environ={})
    assert PASSWORD not in str(raised.value)


def test_no_secret_reaches_a_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = _key_file(tmp_path)
    data = _config({"password": "field-secret"}, {"auth_key_file": str(key)})
    data["tiers"].insert(0, {"name": "gpu", "kind": "memory", "device": "cuda", "max_size_mb": 1})
    with caplog.at_level(logging.DEBUG):
        config = config_from_mapping(data, environ={})
        for spec in config.tiers:
            logging.getLogger("lmtier").info("built %r from %s", spec, spec)
            try:
                build_tier(spec)
            except ConfigError as exc:  # a refusal's text says nothing secret either
                logging.getLogger("lmtier").warning("%s", exc)
    assert caplog.records
    for secret in (PASSWORD, "field-secret", KEY):
        assert secret not in caplog.text


# --- auth_key ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["disk", "remote"])
def test_auth_key_from_a_private_file(tmp_path: Path, kind: str) -> None:
    key = _key_file(tmp_path)
    fields = {"auth_key_file": str(key)}
    data = _config(fields) if kind == "remote" else _config(disk=fields)
    config = config_from_mapping(data, environ={})
    spec = config.tiers[1]
    assert isinstance(spec, DiskTierSpec | RedisTierSpec) and isinstance(spec.auth_key, Secret)
    assert spec.auth_key.reveal() == KEY.encode()  # the one final newline is not the key's
    assert KEY not in repr(config) and "auth_key=Secret('***')" in repr(spec)


def test_auth_key_from_the_environment_equals_the_same_file(tmp_path: Path) -> None:
    key = _key_file(tmp_path)
    from_env = config_from_mapping(_config(disk={"auth_key_env": "K"}), environ={"K": KEY})
    from_file = config_from_mapping(_config(disk={"auth_key_file": str(key)}), environ={})
    assert from_env.tiers[1] == from_file.tiers[1]
    other = config_from_mapping(_config(disk={"auth_key_env": "K"}), environ={"K": "other"})
    assert other.tiers[1] != from_file.tiers[1]


@pytest.mark.parametrize(
    ("mode", "needle"), [(0o640, "chmod 600"), (0o604, "chmod 600"), (0o620, "chmod 600")]
)
def test_a_key_file_others_can_open_is_refused(tmp_path: Path, mode: int, needle: str) -> None:
    key = _key_file(tmp_path, mode)
    with pytest.raises(ConfigError, match=needle) as raised:
        config_from_mapping(_config(disk={"auth_key_file": str(key)}), "c.yaml", environ={})
    assert str(raised.value).startswith("c.yaml: tiers[1] ('disk'): field 'auth_key_file'")
    assert oct(mode) in str(raised.value) and KEY not in str(raised.value)


def test_a_key_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # opening it must not wait for a writer
    for path, needle in ((tmp_path, "not a regular file"), (fifo, "not a regular file")):
        with pytest.raises(ConfigError, match=needle):
            config_from_mapping(_config(disk={"auth_key_file": str(path)}), environ={})
    with pytest.raises(ConfigError, match="no file at"):
        config_from_mapping(_config(disk={"auth_key_file": str(tmp_path / "no")}), environ={})
    empty = _key_file(tmp_path, data=b"\n")
    with pytest.raises(ConfigError, match="is empty"):
        config_from_mapping(_config(disk={"auth_key_file": str(empty)}), environ={})


@pytest.mark.parametrize(
    ("environ", "needle"),
    [({}, "'K' is not set"), ({"K": ""}, "'K' is empty")],
)
def test_auth_key_env_must_be_set(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        config_from_mapping(_config({"auth_key_env": "K"}), environ=environ)


def test_auth_key_from_both_a_file_and_a_variable_is_refused(tmp_path: Path) -> None:
    fields = {"auth_key_file": str(_key_file(tmp_path)), "auth_key_env": "K"}
    with pytest.raises(ConfigError, match="at most one of fields 'auth_key_file' or") as raised:
        config_from_mapping(_config(disk=fields), environ={"K": KEY})
    assert KEY not in str(raised.value)


def test_an_env_override_of_one_source_replaces_the_other(tmp_path: Path) -> None:
    fields = {"auth_key_file": str(_key_file(tmp_path))}
    environ = {"LMTIER_DISK__AUTH_KEY_ENV": "K", "K": "from-env"}
    spec = config_from_mapping(_config(disk=fields), environ=environ).tiers[1]
    assert isinstance(spec, DiskTierSpec) and spec.auth_key == Secret(b"from-env")


def test_auth_key_on_a_memory_tier_is_refused() -> None:
    data = _config()
    data["tiers"][0]["auth_key_env"] = "K"
    with pytest.raises(ConfigError, match="is for disk and redis tiers; a memory tier may not"):
        config_from_mapping(data, environ={"K": KEY})


def test_a_type_error_in_a_secret_field_does_not_show_the_value() -> None:
    with pytest.raises(ConfigError, match="'password' must be a string, got int") as raised:
        config_from_mapping(_config({"password": 987654321}), environ={})
    assert "987654321" not in str(raised.value)


# --- the disk tier's mode ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "folder_mode"),
    [
        ("mode: 0o640", 0o640, 0o750),
        ("mode: '0640'", 0o640, 0o750),
        ("mode: 0640", 0o640, 0o750),  # YAML 1.1's own octal
        ("mode: '0o660'", 0o660, 0o770),
        ("mode: 0o600", 0o600, 0o700),
        ("", 0o600, 0o700),
    ],
)
def test_the_file_mode(tmp_path: Path, text: str, mode: int, folder_mode: int) -> None:
    path = tmp_path / "c.yaml"
    tier = "{name: disk, kind: disk, path: /tmp/x, max_size_mb: 8" + (
        f", {text}}}" if text else "}"
    )
    path.write_text(f"tiers:\n  - {tier}\n")
    spec = load_config(path, environ={}).tiers[0]
    assert isinstance(spec, DiskTierSpec)
    assert (spec.mode, spec.folder_mode) == (mode, folder_mode)
    assert f"mode={oct(mode)}" in repr(spec)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (0o644, "only user and group bits"),
        (0o4600, "only user and group bits"),
        (640, r"decimal number: write 0o640 or '0640'"),
        (0o400, "must let the user read and write"),
        (0o200, "must let the user read and write"),
        ("rw-r-----", "octal mode such as"),
        ("0o9", "octal mode such as"),
        (True, "octal mode"),
        (6.4, "octal mode"),
    ],
)
def test_a_bad_file_mode_is_a_clear_error(value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as raised:
        config_from_mapping(_config(disk={"mode": value}), "c.yaml", environ={})
    assert str(raised.value).startswith("c.yaml: tiers[1] ('disk'): field 'mode'")


def test_mode_is_for_disk_tiers() -> None:
    data = _config({"mode": 0o600})
    with pytest.raises(ConfigError, match="'mode' is for disk tiers; a redis tier may not"):
        config_from_mapping(data, environ={})


async def test_a_configured_auth_key_keys_the_disk_tier(tmp_path: Path) -> None:
    """The secret reaches the tier: entries written under one key are misses under another."""
    value = torch.arange(64, dtype=torch.float32)

    def store(secret: str) -> TieredStore:
        disk = {"name": "disk", "kind": "disk", "path": str(tmp_path / "d"), "max_size_mb": 8}
        data = {"tiers": [{**disk, "auth_key_env": "K"}]}
        return TieredStore(config_from_mapping(data, environ={"K": secret}))

    async with store(KEY) as first:
        assert await first.put("k", value) is PutStatus.LEGAL
    async with store("another secret") as other:
        assert await other.get("k") is None
    async with store(KEY) as same:
        got = await same.get("k")
        assert got is not None and torch.equal(got, value)


async def test_a_configured_mode_reaches_the_files(tmp_path: Path) -> None:
    disk = {"name": "disk", "kind": "disk", "path": str(tmp_path / "d"), "max_size_mb": 8}
    config = config_from_mapping({"tiers": [{**disk, "mode": "0640"}]}, environ={})
    async with TieredStore(config) as store:
        assert await store.put("k", torch.ones(8)) is PutStatus.LEGAL
    files = [p for p in (tmp_path / "d").rglob("*.safetensors")]
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o640
    assert files[0].parent.stat().st_mode & 0o777 == 0o750
