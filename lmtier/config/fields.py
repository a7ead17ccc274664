"""A config field beyond its type: the YAML keys that set it, its check, its help text.

Each dataclass field of a config carries a :class:`Setting` in its metadata; the parser, the
``LMTIER_*`` overrides, ``repr`` and the docs table all read the schema from there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmtier.errors import ConfigError

__all__ = [
    "Place",
    "Setting",
    "allowed_keys",
    "choice",
    "flag",
    "optional",
    "read_fields",
    "seconds",
    "setting",
    "setting_of",
    "shown_fields",
    "text",
    "whole",
]

_KEY = "lmtier"


@dataclass(frozen=True)
class Place:
    """Where a value was read: the section (``file: tiers[1] ('disk')``) and the key."""

    where: str
    key: str
    environ: Mapping[str, str]
    secret: bool = False

    def error(self, problem: str) -> ConfigError:
        """``file: tiers[0] ('cpu'): field 'key' <problem>``."""
        return ConfigError(f"{self.where}: field {self.key!r} {problem}")

    def about(self, problem: str) -> ConfigError:
        """``file: tiers[0] ('cpu'): field 'key': <problem>``."""
        return ConfigError(f"{self.where}: field {self.key!r}: {problem}")

    def wrong_type(self, expected: str, value: object) -> ConfigError:
        shown = "" if self.secret else f" {value!r}"
        return self.error(f"must be {expected}, got {type(value).__name__}{shown}")


Check = Callable[[Any, Place], Any]
"""Turns the value given for a key into the field's value, or raises ConfigError."""


@dataclass(frozen=True)
class Setting:
    """How one field is set from YAML and the environment, and how it shows."""

    help: str  # the docs table's text
    check: Check
    # The YAML keys; () for the field's name. Several are alternatives: at most one is given,
    # and the check learns which from ``Place.key``.
    keys: tuple[str, ...] = ()
    verbatim: bool = False  # an env value is kept as text, not read as YAML ("~" is a path)
    secret: bool = False  # never shown: not in repr, not in an error
    show: Callable[[Any], str] | None = None  # how repr shows a value (None: repr)


def setting(
    help: str,
    check: Check,
    default: Any = dataclasses.MISSING,
    *,
    keys: tuple[str, ...] = (),
    verbatim: bool = False,
    secret: bool = False,
    show: Callable[[Any], str] | None = None,
) -> Any:
    """A dataclass field with its Setting; without ``default`` the field is required."""
    meta = Setting(help, check, keys, verbatim, secret, show)
    return dataclasses.field(default=default, metadata={_KEY: meta})


def setting_of(field: dataclasses.Field[Any]) -> Setting:
    meta = field.metadata.get(_KEY)
    if not isinstance(meta, Setting):
        raise TypeError(f"config field {field.name!r} has no Setting in its metadata")
    return meta


def yaml_keys(field: dataclasses.Field[Any]) -> tuple[str, ...]:
    return setting_of(field).keys or (field.name,)


def settings(cls: type, skip: Sequence[str] = ()) -> Iterator[dataclasses.Field[Any]]:
    """The fields of config class ``cls`` that YAML sets, less ``skip``."""
    return (f for f in dataclasses.fields(cls) if f.name not in skip)


def allowed_keys(cls: type, skip: Sequence[str] = ()) -> tuple[str, ...]:
    return tuple(key for field in settings(cls, skip) for key in yaml_keys(field))


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def read_field(
    raw: Mapping[Any, Any], field: dataclasses.Field[Any], where: str, environ: Mapping[str, str]
) -> Any:
    """The value of ``field`` from ``raw``: its key's value checked, else its default."""
    meta = setting_of(field)
    keys = yaml_keys(field)
    given = [key for key in keys if key in raw]
    if len(given) > 1 or (not given and len(keys) > 1 and _required(field)):
        quoted = " or ".join(map(repr, keys))
        how = "exactly" if _required(field) else "at most"
        got = " and ".join(given) or "neither"
        raise ConfigError(f"{where}: give {how} one of fields {quoted}, got {got}")
    if not given:
        if _required(field):
            raise ConfigError(f"{where}: missing required field {keys[0]!r}")
        return field.default
    key = given[0]
    return meta.check(raw[key], Place(where, key, environ, meta.secret))


def read_fields(
    cls: type, raw: Mapping[Any, Any], where: str, environ: Mapping[str, str], skip: Sequence[str]
) -> dict[str, Any]:
    """Every field of ``cls`` but ``skip``, read from ``raw``, by name."""
    return {f.name: read_field(raw, f, where, environ) for f in settings(cls, skip)}


def shown_fields(obj: Any) -> str:
    """``name=value, ...`` for a config's repr: secrets masked, values shown their way."""
    parts = []
    for field in dataclasses.fields(obj):
        meta = setting_of(field)
        value = getattr(obj, field.name)
        if value is None:
            shown = "None"
        elif meta.show is not None:  # a secret's own show masks it too (Secret's repr)
            shown = meta.show(value)
        elif meta.secret:
            shown = "'***'"
        else:
            shown = repr(value)
        parts.append(f"{field.name}={shown}")
    return ", ".join(parts)


# ------------------------------------------------------------------------- checks
def optional(check: Check) -> Check:
    """``check``, with YAML's null meaning the field's default (None)."""

    def checked(value: Any, place: Place) -> Any:
        return None if value is None else check(value, place)

    return checked


def text(*, nonempty: bool = False, hint: str = "") -> Callable[[Any, Place], str]:
    """A string; ``nonempty``: not blank (``hint`` says what to do instead)."""

    def checked(value: Any, place: Place) -> str:
        if not isinstance(value, str):
            raise place.wrong_type("a string", value)
        if nonempty and not value.strip():
            raise place.error(f"must not be empty{hint}")
        return value

    return checked


def flag(value: Any, place: Place) -> bool:
    if not isinstance(value, bool):
        raise place.wrong_type("true or false", value)
    return value


def number(value: Any, place: Place) -> float:
    """A finite int or float: YAML's .inf and .nan are no one's timeout or size."""
    # bool is an int subclass, but `max_size_gb: true` is a mistake, not 1 GB.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise place.wrong_type("a number", value)
    if not math.isfinite(value):
        raise place.error(f"must be a finite number, got {value!r}")
    return value


def seconds(value: Any, place: Place) -> float:
    """A duration: finite and > 0."""
    value = number(value, place)
    if not value > 0:
        raise place.error(f"must be finite and > 0, got {value!r}")
    return float(value)


def whole(value: Any, place: Place) -> int:
    """A whole number > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise place.wrong_type("a whole number of entries > 0", value)
    return value


def choice(known: Callable[[], Sequence[str]]) -> Check:
    """One of the names ``known()`` gives when the value is read."""

    def checked(value: Any, place: Place) -> str:
        name = text()(value, place)
        names = known()
        if name not in names:
            raise place.error(f"has unknown value {name!r}; known: {', '.join(names)}")
        return name

    return checked
