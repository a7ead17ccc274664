"""The store config an engine integration runs: the user's, with ``prefix`` as the evictor of
its last tier when that tier names none.

lmtier's tiers sit below the engine's own host tier (vLLM's CPU tier, SGLang's HiCache host
pool), which evicts by LRU.  Replays measured LRU tiers over a prefix last tier best: up to
twice LRU's hits on the conversation trace, never more than 2% behind LRU on any workload,
while prefix on a middle tier cost up to 3.3% (docs/policies.md, "The default evictor").  A tier
that names an evictor keeps it; the others get the library's default (``TierConfig.evictor``).

An integration that derives a namespace of its own (the model, dtype, geometry) runs the store
``in_namespace``: the namespace then reaches the redis key names whatever ``key_prefix`` says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from typing import Any

from lmtier.config import (
    RedisTierSpec,
    StoreConfig,
    config_from_mapping,
    parse_config,
    read_config_file,
)

__all__ = ["ENGINE_EVICTOR", "engine_config", "in_namespace", "with_engine_evictor"]

#: The evictor of an engine integration's last tier when it names none.
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
        data, source = read_config_file(path)
        return config_from_mapping(with_engine_evictor(data), source)
    if env_overrides:
        return config_from_mapping(with_engine_evictor(mapping), source)
    return parse_config(with_engine_evictor(mapping), source)


def with_engine_evictor(data: Any) -> Any:
    """``data`` with ``evictor: ENGINE_EVICTOR`` on its last tier if that names none (a copy);
    anything that is not a config's shape unchanged, for the parser to name what is wrong."""
    tiers = data.get("tiers") if isinstance(data, Mapping) else None
    if not isinstance(tiers, list | tuple) or not tiers:
        return data
    last = tiers[-1]
    if not isinstance(last, Mapping) or "evictor" in last:
        return data
    return {**data, "tiers": [*tiers[:-1], {**last, "evictor": ENGINE_EVICTOR}]}


def in_namespace(config: StoreConfig, namespace: str) -> StoreConfig:
    """``config`` with ``namespace``, and each configured redis ``key_prefix`` followed by a
    digest of it (``PREFIX:<digest>``).

    A tier without a ``key_prefix`` derives its prefix from the namespace already; one with a
    prefix would otherwise name every namespace's entries alike, and stores of two models
    would overwrite each other's values on a shared server (then drop them as another
    namespace's).  The configured prefix stays in front, so ACLs on it still apply.
    """
    digest = hashlib.blake2b(namespace.encode("utf-8", "surrogatepass"), digest_size=8)
    tiers = tuple(
        dataclasses.replace(tier, key_prefix=f"{tier.key_prefix}:{digest.hexdigest()}")
        if isinstance(tier, RedisTierSpec) and tier.key_prefix is not None
        else tier
        for tier in config.tiers
    )
    return dataclasses.replace(config, namespace=namespace, tiers=tiers)
