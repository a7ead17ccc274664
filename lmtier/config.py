"""Store configuration: YAML plus ``LMTIER_*`` env overrides, validated into frozen dataclasses."""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import torch
import yaml

from lmtier.admission import ADMISSION_POLICIES
from lmtier.errors import ConfigError
from lmtier.evictor.registry import evictor_names

__all__ = [
    "GB",
    "MB",
    "MetricsConfig",
    "StoreConfig",
    "TierConfig",
    "apply_env_overrides",
    "config_from_mapping",
    "load_config",
    "parse_config",
    "read_config_file",
]

GB = 1024**3
MB = 1024**2

ENV_PREFIX = "LMTIER_"
CONFIG_ENV = "LMTIER_CONFIG"
#: The level of lmtier's loggers (DEBUG, INFO, WARNING, ...), read when lmtier is imported.
LOG_LEVEL_ENV = "LMTIER_LOG_LEVEL"
#: ``LMTIER_*`` variables that are not config overrides.
RESERVED_ENV = (CONFIG_ENV, LOG_LEVEL_ENV)

_KINDS = ("disk", "memory", "redis")
_REDIS_SCHEMES = ("redis", "rediss")
_DURABILITIES = ("fsync", "none")
_SIZE_UNITS = {"max_size_gb": GB, "max_size_mb": MB}
_TOP_KEYS = (
    "clean_copies",
    "metrics",
    "namespace",
    "promote_on_hit",
    "room_timeout_s",
    "tiers",
    "write_ahead",
)
_METRICS_KEYS = ("host", "port")
_REDIS_KEYS = (
    "cluster",
    "connect_timeout_s",
    "key_prefix",
    "op_timeout_s",
    "password",
    "reconnect_max_s",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "url",
    "username",
)
_TLS_FILES = ("tls_ca_file", "tls_cert_file", "tls_key_file")
_TIER_KEYS = tuple(
    sorted(
        (
            "admission",
            "admission_window",
            "device",
            "durability",
            "evictor",
            "kind",
            "max_size_gb",
            "max_size_mb",
            "name",
            "path",
            "pinned",
            "required",
            *_REDIS_KEYS,
        )
    )
)
_KIND_ONLY = {"memory": ("device", "pinned"), "disk": ("durability", "path"), "redis": _REDIS_KEYS}
# Env values for these stay verbatim: YAML would read a path such as "~" or "null" as None.
_STR_FIELDS = frozenset(
    {
        "admission",
        "device",
        "durability",
        "evictor",
        "key_prefix",
        "kind",
        "name",
        "namespace",
        "password",
        "path",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
        "url",
        "username",
    }
)
_REQUIRED = object()


@dataclass(frozen=True)
class TierConfig:
    """One tier of the cascade; parse_config and load_config build and validate these."""

    name: str  # unique among tiers, case-insensitively (env overrides match it that way)
    kind: str  # "memory", "disk" or "redis"
    max_size_bytes: int
    evictor: str = "lru"
    device: str = "cpu"  # memory tiers: "cpu", "cuda" or "cuda:N"
    pinned: bool = True  # cpu memory tiers pin their buffers when CUDA is available
    path: str | None = None  # disk tiers: the folder, ~ expanded
    required: bool = False  # a cuda tier on a machine without CUDA is skipped unless required
    durability: str = "none"  # disk tiers: "none" or "fsync"
    admission: str = "all"  # "all" or "second_hit" (a chunk is admitted when offered twice)
    admission_window: int | None = None  # second_hit's memory in entries; None: 4x capacity
    # redis tiers: the server (redis:// or rediss:// for TLS; with ``cluster``, any node)
    url: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never printed in logs
    key_prefix: str | None = None  # None: derived from the store's namespace
    connect_timeout_s: float = 2.0
    op_timeout_s: float = 2.0  # the most any one round trip to the server may take
    reconnect_max_s: float = 10.0  # the longest wait between reconnection probes
    cluster: bool = False  # a Redis Cluster, through redis-py's cluster client
    # rediss:// only: the CA bundle that signs the server's certificate (None: the system's),
    # and this client's certificate and key for servers that ask for one (tls-auth-clients)
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @property
    def max_size_gb(self) -> float:
        return self.max_size_bytes / GB


@dataclass(frozen=True)
class MetricsConfig:
    """A monitored store: it times its puts, gets and loads for its histograms, and with a
    ``port`` serves its Prometheus metrics over HTTP (from open to close)."""

    port: int | None = None  # None: no server; 0: any free port (``metrics_port`` tells which)
    host: str = "0.0.0.0"  # the address to listen on; every interface by default


@dataclass(frozen=True)
class StoreConfig:
    """The whole store: tiers fastest first."""

    tiers: tuple[TierConfig, ...]
    promote_on_hit: bool = True
    # A promotion leaves the lower entry as a clean copy, so demoting it again writes nothing;
    # false keeps tiers exclusive (a key in one tier: more distinct keys, a write per re-demotion).
    clean_copies: bool = True
    # A memory tier nearly full copies its next victims to the tier below in the background,
    # as clean copies, so that the puts that evict them write nothing then (needs clean_copies).
    write_ahead: bool = False
    room_timeout_s: float = 30.0  # how long a put waits for in-flight demotions to free room
    # What makes cached KV incompatible beyond the key (dtype, KV layout, weights revision):
    # persistent tiers keep each namespace apart, so one never reads another's entries.
    namespace: str = ""
    # None: neither histograms nor an HTTP server (the registry still has the stats).
    metrics: MetricsConfig | None = None


def _type_error(where: str, key: str, expected: str, value: object) -> ConfigError:
    return ConfigError(
        f"{where}: field {key!r} must be {expected}, got {type(value).__name__} {value!r}"
    )


def _field(raw: Mapping[Any, Any], key: str, where: str, default: object) -> object:
    if key in raw:
        return raw[key]
    if default is _REQUIRED:
        raise ConfigError(f"{where}: missing required field {key!r}")
    return default


def _str(raw: Mapping[Any, Any], key: str, where: str, default: object = _REQUIRED) -> str:
    value = _field(raw, key, where, default)
    if not isinstance(value, str):
        raise _type_error(where, key, "a string", value)
    return value


def _bool(raw: Mapping[Any, Any], key: str, where: str, default: bool) -> bool:
    value = _field(raw, key, where, default)
    if not isinstance(value, bool):
        raise _type_error(where, key, "true or false", value)
    return value


def _number(raw: Mapping[Any, Any], key: str, where: str, default: object = _REQUIRED) -> float:
    value = _field(raw, key, where, default)
    # bool is an int subclass, but `max_size_gb: true` is a mistake, not 1 GB.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(where, key, "a number", value)
    return value


def _choice(
    raw: Mapping[Any, Any], key: str, where: str, known: Sequence[str], default: object
) -> str:
    value = _str(raw, key, where, default)
    if value not in known:
        raise ConfigError(
            f"{where}: field {key!r} has unknown value {value!r}; known: {', '.join(known)}"
        )
    return value


def _reject_unknown(raw: Mapping[Any, Any], known: tuple[str, ...], where: str) -> None:
    unknown = [key for key in raw if key not in known]
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
        )


def _size_bytes(raw: Mapping[Any, Any], where: str) -> int:
    given = [key for key in _SIZE_UNITS if key in raw]
    if len(given) != 1:
        raise ConfigError(
            f"{where}: give exactly one of fields 'max_size_gb' or 'max_size_mb', "
            f"got {' and '.join(given) or 'neither'}"
        )
    key = given[0]
    value = _number(raw, key, where)
    size = int(value * _SIZE_UNITS[key]) if math.isfinite(value) else 0
    if size <= 0:
        raise ConfigError(f"{where}: field {key!r} must be finite and over 0 bytes, got {value!r}")
    return size


def _device(text: str, where: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ConfigError(f"{where}: field 'device' {text!r} is not a device: {exc}") from exc
    # "cpu:0" parses, but a tier's cpu memory has no index to mean anything by it.
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise ConfigError(f"{where}: field 'device' must be cpu, cuda or cuda:N, got {text!r}")
    return str(device)


def _parse_tier(raw: object, index: int, source: str) -> TierConfig:
    where = f"{source}: tiers[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__} {raw!r}")
    if isinstance(raw.get("name"), str) and raw["name"]:
        where += f" ({raw['name']!r})"
    _reject_unknown(raw, _TIER_KEYS, where)
    name = _str(raw, "name", where)
    if not name:
        raise ConfigError(f"{where}: field 'name' must not be empty")
    kind = _choice(raw, "kind", where, _KINDS, _REQUIRED)
    for other, keys in _KIND_ONLY.items():
        for key in keys:
            if other != kind and key in raw:
                raise ConfigError(
                    f"{where}: field {key!r} is for {other} tiers; a {kind} tier may not set it"
                )
    path = None
    if kind == "disk":
        path = _str(raw, "path", where)
        if not path.strip():
            raise ConfigError(f"{where}: field 'path' must not be empty")
        path = os.path.expanduser(path)
    redis: dict[str, Any] = _parse_redis(raw, where) if kind == "redis" else {}
    return TierConfig(
        name=name,
        kind=kind,
        max_size_bytes=_size_bytes(raw, where),
        evictor=_choice(raw, "evictor", where, evictor_names(), "lru"),
        device=_device(_str(raw, "device", where, "cpu"), where),
        pinned=_bool(raw, "pinned", where, True),
        path=path,
        required=_bool(raw, "required", where, False),
        durability=_choice(raw, "durability", where, _DURABILITIES, "none"),
        admission=_choice(raw, "admission", where, ADMISSION_POLICIES, "all"),
        admission_window=_window(raw, where),
        **redis,
    )


def _window(raw: Mapping[Any, Any], where: str) -> int | None:
    value = _field(raw, "admission_window", where, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _type_error(where, "admission_window", "a whole number of entries > 0", value)
    return value


def _parse_redis(raw: Mapping[Any, Any], where: str) -> dict[str, Any]:
    """The fields of a redis tier, checked."""
    url = _str(raw, "url", where)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise ConfigError(f"{where}: field 'url' {url!r} is not a URL: {exc}") from exc
    if parts.scheme not in _REDIS_SCHEMES or not parts.hostname:
        raise ConfigError(
            f"{where}: field 'url' must be redis://HOST[:PORT] or rediss://HOST[:PORT] (TLS), "
            f"got {url!r}"
        )
    fields: dict[str, Any] = {"url": url, "cluster": _bool(raw, "cluster", where, False)}
    for key in ("username", "password", "key_prefix"):
        fields[key] = None if raw.get(key) is None else _str(raw, key, where)
    if fields["key_prefix"] == "":
        raise ConfigError(f"{where}: field 'key_prefix' must not be empty (omit it for a default)")
    for key in ("connect_timeout_s", "op_timeout_s", "reconnect_max_s"):
        value = _number(raw, key, where, getattr(TierConfig, key))
        if not 0 < value < math.inf:  # also rejects NaN
            raise ConfigError(f"{where}: field {key!r} must be finite and > 0, got {value!r}")
        fields[key] = float(value)
    fields.update(_tls_files(raw, where, tls=parts.scheme == "rediss"))
    return fields


def _tls_files(raw: Mapping[Any, Any], where: str, tls: bool) -> dict[str, str | None]:
    """The TLS file fields of a redis tier: only with rediss://, a certificate with its key,
    each naming a file that exists (a typo shows here, not as a tier that never connects)."""
    files = {key: None if raw.get(key) is None else _str(raw, key, where) for key in _TLS_FILES}
    given = [key for key, path in files.items() if path is not None]
    if given and not tls:
        raise ConfigError(f"{where}: field {given[0]!r} needs a rediss:// url (TLS)")
    if (files["tls_cert_file"] is None) != (files["tls_key_file"] is None):
        raise ConfigError(f"{where}: fields 'tls_cert_file' and 'tls_key_file' go together")
    for key in given:
        path = files[key] = os.path.expanduser(str(files[key]))
        if not os.path.isfile(path):
            raise ConfigError(f"{where}: field {key!r}: no file at {path!r}")
    return files


def _parse_metrics(raw: object, source: str) -> MetricsConfig | None:
    where = f"{source}: metrics"
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{where} must be a mapping such as {{port: 9400}}, got {type(raw).__name__} {raw!r}"
        )
    _reject_unknown(raw, _METRICS_KEYS, where)
    port = raw.get("port")
    # bool is an int subclass, and 9400.0 is no port number either.
    bad = isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
    if port is not None and bad:
        raise _type_error(where, "port", "a whole number from 0 to 65535 (0: any free port)", port)
    host = _str(raw, "host", where, MetricsConfig.host)
    if not host.strip():
        raise ConfigError(f"{where}: field 'host' must not be empty (omit it for 0.0.0.0)")
    return MetricsConfig(port=port, host=host)


def parse_config(data: object, source: str = "<config>") -> StoreConfig:
    """Validate an already-loaded mapping; ``source`` names it in error messages."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping with a 'tiers' list, "
            f"got {type(data).__name__}"
        )
    _reject_unknown(data, _TOP_KEYS, source)
    raw_tiers = _field(data, "tiers", source, _REQUIRED)
    if not isinstance(raw_tiers, list | tuple) or not raw_tiers:
        raise _type_error(source, "tiers", "a non-empty list of tiers", raw_tiers)
    tiers = tuple(_parse_tier(raw, i, source) for i, raw in enumerate(raw_tiers))
    seen: dict[str, int] = {}
    for i, tier in enumerate(tiers):
        first = seen.setdefault(tier.name.lower(), i)
        if first != i:
            raise ConfigError(
                f"{source}: tiers[{i}] field 'name' {tier.name!r} duplicates tiers[{first}] "
                "(names are compared case-insensitively)"
            )
    room_timeout_s = _number(data, "room_timeout_s", source, 30.0)
    if not room_timeout_s > 0:  # also rejects NaN
        raise ConfigError(f"{source}: field 'room_timeout_s' must be > 0, got {room_timeout_s!r}")
    clean_copies = _bool(data, "clean_copies", source, True)
    write_ahead = _bool(data, "write_ahead", source, False)
    if write_ahead and not clean_copies:
        raise ConfigError(
            f"{source}: field 'write_ahead' needs 'clean_copies': what is written ahead is a "
            "clean copy"
        )
    return StoreConfig(
        tiers=tiers,
        promote_on_hit=_bool(data, "promote_on_hit", source, True),
        clean_copies=clean_copies,
        write_ahead=write_ahead,
        room_timeout_s=float(room_timeout_s),
        namespace=_str(data, "namespace", source, ""),
        metrics=_parse_metrics(data.get("metrics"), source),
    )


def _env_value(var: str, field: str, text: str) -> object:
    if field in _STR_FIELDS:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{var}: cannot read {text!r} as a YAML value") from exc


def apply_env_overrides(data: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """A copy of ``data`` with ``LMTIER_<FIELD>`` and ``LMTIER_<TIER>__<FIELD>`` applied.

    ``LMTIER_CONFIG`` names the file and is not an override. Tier names match
    case-insensitively; setting one size unit drops the other from that tier.
    """
    out: dict[str, Any] = copy.deepcopy(dict(data))
    size_vars: dict[str, str] = {}
    for var in sorted(environ):  # sorted: the same environment always gives the same result
        if not var.startswith(ENV_PREFIX) or var in RESERVED_ENV:
            continue
        target, nested, field = var[len(ENV_PREFIX) :].rpartition("__")
        field = field.lower()
        if not nested:
            if field not in _TOP_KEYS or field == "tiers":
                known = ", ".join(key for key in _TOP_KEYS if key != "tiers")
                raise ConfigError(
                    f"{var}: unknown top-level field {field!r}; known: {known} (or "
                    f"LMTIER_<TIER>__<FIELD> for a tier's field; {', '.join(RESERVED_ENV)} are "
                    "not overrides)"
                )
            out[field] = _env_value(var, field, environ[var])
            continue
        raw_tiers = out.get("tiers")
        tiers = [t for t in raw_tiers if isinstance(t, dict)] if isinstance(raw_tiers, list) else []
        matches = [t for t in tiers if str(t.get("name", "")).lower() == target.lower()]
        if not matches:
            known = ", ".join(repr(t.get("name")) for t in tiers) or "none"
            hint = ""
            if target.lower() == "metrics":
                hint = f" (the metrics section is set whole: {ENV_PREFIX}METRICS='{{port: 9400}}')"
            raise ConfigError(f"{var}: no tier named {target.lower()!r}; tiers: {known}{hint}")
        if field not in _TIER_KEYS:
            raise ConfigError(
                f"{var}: unknown tier field {field!r}; known: {', '.join(_TIER_KEYS)}"
            )
        if field in _SIZE_UNITS:
            earlier = size_vars.setdefault(target.lower(), var)
            if earlier != var:
                raise ConfigError(f"{var} conflicts with {earlier}: set one size per tier")
        value = _env_value(var, field, environ[var])
        for tier in matches:
            if field in _SIZE_UNITS:
                for key in _SIZE_UNITS:
                    tier.pop(key, None)
            tier[field] = value
    return out


def config_from_mapping(
    data: Mapping[str, Any],
    source: str = "<mapping>",
    environ: Mapping[str, str] | None = None,
) -> StoreConfig:
    """Validate a config mapping as a YAML file's content is: ``LMTIER_*`` overrides from
    ``environ`` (default ``os.environ``) applied first, then ``parse_config``."""
    env = os.environ if environ is None else environ
    if not isinstance(data, Mapping):
        return parse_config(data, source)
    overridden = apply_env_overrides(data, env)
    try:
        return parse_config(overridden, source)
    except ConfigError as exc:
        overrides = sorted(v for v in env if v.startswith(ENV_PREFIX) and v not in RESERVED_ENV)
        if not overrides:
            raise
        try:
            parse_config(data, source)
        except ConfigError:
            raise exc from None  # the content itself is at fault
        # The content alone is valid: the environment's values are what broke it.
        raise ConfigError(f"{exc} (a value set by {', '.join(overrides)})") from None


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> StoreConfig:
    """Read a YAML config (``path``, else ``$LMTIER_CONFIG``), apply env overrides, validate."""
    env = os.environ if environ is None else environ
    data, source = read_config_file(path, env)
    return config_from_mapping(data, source, env)


def read_config_file(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Any, str]:
    """The YAML content of ``path`` (else ``$LMTIER_CONFIG``'s file), not yet validated, and
    the file's name for error messages."""
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"no config given: pass a path or set {CONFIG_ENV}")
    source = os.path.expanduser(os.fspath(path))
    try:
        with open(source, encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {source}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {source}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: malformed YAML: {exc}") from exc
    return data, source


def apply_log_level(environ: Mapping[str, str] | None = None) -> None:
    """Set the level of lmtier's loggers from ``LMTIER_LOG_LEVEL``, if set (a bad value is
    reported as a warning, not raised: logging must never stop a store)."""
    env = os.environ if environ is None else environ
    text = env.get(LOG_LEVEL_ENV, "").strip()
    if not text:
        return
    level = logging.getLevelName(text.upper())
    if not isinstance(level, int):
        logging.getLogger("lmtier").warning(
            "%s=%r is not a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL)",
            LOG_LEVEL_ENV,
            text,
        )
        return
    logging.getLogger("lmtier").setLevel(level)
