"""The whole store's config: its top-level fields, its metrics section and its tiers, validated
from an already-loaded mapping."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmtier.config.fields import (
    Place,
    allowed_keys,
    flag,
    number,
    read_field,
    read_fields,
    seconds,
    setting,
    text,
)
from lmtier.config.tier_specs import TierSpec, spec_class, tier_kinds
from lmtier.errors import ConfigError

__all__ = [
    "DEFAULT_METRICS_HOST",
    "MetricsConfig",
    "StoreConfig",
    "kinds_with",
    "parse_config",
    "tier_keys",
    "top_level_keys",
]

#: Loopback: a store's metrics are not the network's unless ``host`` says so.
DEFAULT_METRICS_HOST = "127.0.0.1"


def _port(value: Any, place: Place) -> int | None:
    # bool is an int subclass, and 9400.0 is no port number either.
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535
    ):
        raise place.wrong_type("a whole number from 0 to 65535 (0: any free port)", value)
    return value


@dataclass(frozen=True)
class MetricsConfig:
    """A monitored store: it times its puts, gets and loads for its histograms, and with a
    ``port`` serves its Prometheus metrics over HTTP (from open to close)."""

    port: int | None = setting(
        "none: no server; 0: any free port (`metrics_port` tells which)", _port, None
    )
    host: str = setting(
        "the address to listen on: loopback unless set (`0.0.0.0`: every interface)",
        text(nonempty=True, hint=f" (omit it for {DEFAULT_METRICS_HOST})"),
        DEFAULT_METRICS_HOST,
    )


def _interval(value: Any, place: Place) -> float:
    """Seconds between two lines, or 0 for none."""
    value = number(value, place)  # finite
    if value < 0:
        raise place.error(f"must be a number of seconds >= 0 (0: never), got {value!r}")
    return float(value)


def _metrics(value: Any, place: Place) -> MetricsConfig | None:
    where = f"{place.where}: metrics"
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where} must be a mapping such as {{port: 9400}}, "
            f"got {type(value).__name__} {value!r}"
        )
    _reject_unknown(value, tuple(sorted(allowed_keys(MetricsConfig))), where)
    return MetricsConfig(**read_fields(MetricsConfig, value, where, place.environ, ()))


def _tiers(value: Any, place: Place) -> tuple[TierSpec, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise place.wrong_type("a non-empty list of tiers", value)
    tiers = tuple(_parse_tier(raw, i, place.where, place.environ) for i, raw in enumerate(value))
    seen: dict[str, int] = {}
    for i, tier in enumerate(tiers):
        first = seen.setdefault(tier.name.lower(), i)
        if first != i:
            raise ConfigError(
                f"{place.where}: tiers[{i}] field 'name' {tier.name!r} duplicates "
                f"tiers[{first}] (names are compared case-insensitively)"
            )
    return tiers


@dataclass(frozen=True)
class StoreConfig:
    """The whole store: tiers fastest first."""

    tiers: tuple[TierSpec, ...] = setting("the tiers, fastest first", _tiers)
    promote_on_hit: bool = setting("copy a lower-tier hit to the top tier", flag, True)
    # A promotion leaves the lower entry as a clean copy, so demoting it again writes nothing;
    # false keeps tiers exclusive (a key in one tier: more distinct keys, a write per re-demotion).
    clean_copies: bool = setting(
        "a promotion leaves the lower entry as a clean copy (false: exclusive tiers)", flag, True
    )
    # A memory tier nearly full copies its next victims to the tier below in the background,
    # as clean copies, so that the puts that evict them write nothing then (needs clean_copies).
    write_ahead: bool = setting(
        "a nearly full memory tier copies its next victims down early", flag, False
    )
    room_timeout_s: float = setting(
        "how long a put may wait for in-flight moves to free room", seconds, 30.0
    )
    # What makes cached KV incompatible beyond the key (dtype, KV layout, weights revision):
    # persistent tiers keep each namespace apart, so one never reads another's entries.
    namespace: str = setting(
        "what else makes KV incompatible (dtype, layout)", text(), "", verbatim=True
    )
    # Read by the engine integrations (vLLM, SGLang): the store itself logs no such line.
    report_interval_s: float = setting(
        "seconds between the engine integrations' INFO lines of lookups, hits, blocks stored "
        "and loaded and bytes per tier (a line only after activity; 0: never)",
        _interval,
        60.0,
    )
    # None: neither histograms nor an HTTP server (the registry still has the stats).
    metrics: MetricsConfig | None = setting(
        "time operations; with a `port`, serve Prometheus metrics", _metrics, None
    )


def top_level_keys() -> tuple[str, ...]:
    return tuple(sorted(allowed_keys(StoreConfig)))


def tier_keys() -> tuple[str, ...]:
    """Every key some kind of tier may set."""
    keys = {"kind"}
    for kind in tier_kinds():
        keys.update(allowed_keys(spec_class(kind)))
    return tuple(sorted(keys))


def kinds_with(key: str) -> list[str]:
    """The kinds of tier whose YAML may set ``key``."""
    return [kind for kind in tier_kinds() if key in allowed_keys(spec_class(kind))]


def _reject_unknown(raw: Mapping[Any, Any], known: tuple[str, ...], where: str) -> None:
    unknown = [key for key in raw if key not in known]
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
        )


def _parse_tier(raw: object, index: int, source: str, environ: Mapping[str, str]) -> TierSpec:
    where = f"{source}: tiers[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__} {raw!r}")
    if isinstance(raw.get("name"), str) and raw["name"]:
        where += f" ({raw['name']!r})"
    _reject_unknown(raw, tier_keys(), where)
    fields = {f.name: f for f in TierSpec.__dataclass_fields__.values()}
    name = read_field(raw, fields["name"], where, environ)
    if not name:
        raise ConfigError(f"{where}: field 'name' must not be empty")
    kind = read_field(raw, fields["kind"], where, environ)
    spec = spec_class(kind)
    mine = allowed_keys(spec)
    for key in raw:
        if key not in mine and key != "kind":
            owners = " and ".join(kinds_with(key))
            raise ConfigError(
                f"{where}: field {key!r} is for {owners} tiers; a {kind} tier may not set it"
            )
    tier = spec(kind=kind, **read_fields(spec, raw, where, environ, skip=("kind",)))
    tier.check_together(where)
    return tier


def parse_config(
    data: object, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> StoreConfig:
    """Validate an already-loaded mapping; ``source`` names it in error messages.

    ``environ`` (default ``os.environ``) is where ``auth_key_env`` variables are read.
    """
    env = os.environ if environ is None else environ
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping with a 'tiers' list, "
            f"got {type(data).__name__}"
        )
    _reject_unknown(data, top_level_keys(), source)
    config = StoreConfig(**read_fields(StoreConfig, data, source, env, ()))
    if config.write_ahead and not config.clean_copies:
        raise ConfigError(
            f"{source}: field 'write_ahead' needs 'clean_copies': what is written ahead is a "
            "clean copy"
        )
    return config
