"""Config files: read (``path`` or ``$LMTIER_CONFIG``), overridden from the environment,
validated; and the log level the environment asks for."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from lmtier.config.env import (
    CONFIG_ENV,
    ENV_PREFIX,
    LOG_LEVEL_ENV,
    RESERVED_ENV,
    apply_env_overrides,
)
from lmtier.config.store_config import StoreConfig, parse_config
from lmtier.config.strict_yaml import load_yaml
from lmtier.errors import ConfigError

__all__ = ["apply_log_level", "config_from_mapping", "load_config", "read_config_file"]


def config_from_mapping(
    data: Mapping[str, Any],
    source: str = "<mapping>",
    environ: Mapping[str, str] | None = None,
) -> StoreConfig:
    """Validate a config mapping as a YAML file's content is: ``LMTIER_*`` overrides from
    ``environ`` (default ``os.environ``) applied first, then ``parse_config``."""
    env = os.environ if environ is None else environ
    if not isinstance(data, Mapping):
        return parse_config(data, source, env)
    overridden = apply_env_overrides(data, env)
    try:
        return parse_config(overridden, source, env)
    except ConfigError as exc:
        overrides = sorted(v for v in env if v.startswith(ENV_PREFIX) and v not in RESERVED_ENV)
        if not overrides:
            raise
        try:
            parse_config(data, source, env)
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
    the file's name for error messages. A key given twice in a mapping is a ConfigError."""
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"no config given: pass a path or set {CONFIG_ENV}")
    source = os.path.expanduser(os.fspath(path))
    try:
        with open(source, encoding="utf-8") as file:
            data = load_yaml(file, source)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {source}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {source}: {exc}") from exc
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
