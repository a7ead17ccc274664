"""The store config an engine integration runs: the user's, with ``prefix`` as the evictor of
every tier that names none.

lmtier's tiers sit below the engine's own host tier (vLLM's CPU tier, SGLang's HiCache host
pool), which evicts by LRU; below an LRU tier the prefix policy kept up to twice LRU's hits on
the replayed conversation trace and never fell more than 2% behind it on any workload measured
(docs/policies.md, "The default evictor").  A tier that names an evictor keeps it, and a config
built or loaded by the library itself keeps the library's default (``TierConfig.evictor``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lmtier.config import StoreConfig, config_from_mapping, load_config, parse_config

__all__ = ["ENGINE_EVICTOR", "engine_config"]

#: The evictor of an engine integration's tiers that name none.
ENGINE_EVICTOR = "prefix"


def engine_config(
    path: str | os.PathLike[str] | None,
    mapping: Mapping[str, Any] | None,
    source: str,
    *,
    env_overrides: bool = True,
) -> StoreConfig:
    """The config ``mapping`` gives (named ``source`` in errors; ``LMTIER_*`` overrides applied
    unless not ``env_overrides``), else the file ``path``, else ``$LMTIER_CONFIG``'s file."""
    if mapping is None:
        return load_config(path, default_evictor=ENGINE_EVICTOR)
    if env_overrides:
        return config_from_mapping(mapping, source, default_evictor=ENGINE_EVICTOR)
    return parse_config(dict(mapping), source, default_evictor=ENGINE_EVICTOR)
