"""``LMTIER_*`` environment overrides, applied to a config mapping before it is validated."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from lmtier.config.fields import setting_of, yaml_keys
from lmtier.config.store_config import StoreConfig, tier_keys, top_level_keys
from lmtier.config.strict_yaml import load_yaml
from lmtier.config.tier_specs import spec_class, tier_kinds
from lmtier.errors import ConfigError

__all__ = ["CONFIG_ENV", "ENV_PREFIX", "LOG_LEVEL_ENV", "RESERVED_ENV", "apply_env_overrides"]

ENV_PREFIX = "LMTIER_"
CONFIG_ENV = "LMTIER_CONFIG"
#: The level of lmtier's loggers (DEBUG, INFO, WARNING, ...), read when lmtier is imported.
LOG_LEVEL_ENV = "LMTIER_LOG_LEVEL"
#: ``LMTIER_*`` variables that are not config overrides.
RESERVED_ENV = (CONFIG_ENV, LOG_LEVEL_ENV)


def _config_fields() -> list[dataclasses.Field[Any]]:
    found = list(dataclasses.fields(StoreConfig))
    for kind in tier_kinds():
        found.extend(dataclasses.fields(spec_class(kind)))
    return found


def _verbatim_keys() -> set[str]:
    """Keys whose env values stay text: YAML would read a path such as "~" or "null" as None."""
    return {key for f in _config_fields() if setting_of(f).verbatim for key in yaml_keys(f)}


def _alternatives(key: str) -> tuple[str, ...]:
    """The keys that set the same field as ``key`` (``max_size_gb``: both size units)."""
    for f in _config_fields():
        if key in yaml_keys(f):
            return yaml_keys(f)
    return (key,)


def _env_value(var: str, key: str, text: str) -> object:
    if key in _verbatim_keys():
        return text
    try:
        return load_yaml(text)
    except ConfigError as exc:
        raise ConfigError(f"{var}: cannot read {text!r} as a YAML value ({exc})") from exc


def apply_env_overrides(data: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """A copy of ``data`` with ``LMTIER_<FIELD>`` and ``LMTIER_<TIER>__<FIELD>`` applied.

    ``LMTIER_CONFIG`` names the file and is not an override. Tier names match
    case-insensitively; setting one of a field's alternative keys (a size unit, a secret's
    source) drops the others from that tier.
    """
    out: dict[str, Any] = copy.deepcopy(dict(data))
    set_by: dict[tuple[str, tuple[str, ...]], str] = {}
    for var in sorted(environ):  # sorted: the same environment always gives the same result
        if not var.startswith(ENV_PREFIX) or var in RESERVED_ENV:
            continue
        target, nested, key = var[len(ENV_PREFIX) :].rpartition("__")
        key = key.lower()
        if not nested:
            if key not in top_level_keys() or key == "tiers":
                known = ", ".join(k for k in top_level_keys() if k != "tiers")
                raise ConfigError(
                    f"{var}: unknown top-level field {key!r}; known: {known} (or "
                    f"LMTIER_<TIER>__<FIELD> for a tier's field; {', '.join(RESERVED_ENV)} are "
                    "not overrides)"
                )
            out[key] = _env_value(var, key, environ[var])
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
        if key not in tier_keys():
            raise ConfigError(f"{var}: unknown tier field {key!r}; known: {', '.join(tier_keys())}")
        group = _alternatives(key)
        earlier = set_by.setdefault((target.lower(), group), var)
        if earlier != var:
            raise ConfigError(
                f"{var} conflicts with {earlier}: set one of {', '.join(group)} per tier"
            )
        value = _env_value(var, key, environ[var])
        for tier in matches:
            for other in group:
                tier.pop(other, None)
            tier[key] = value
    return out
