"""How the SGLang HiCache backend names its keys and reads its lmtier config.

Kept apart from the backend (``lmtier.integrations.sglang``) because both are pure functions of
SGLang's ``HiCacheStorageConfig`` and the backend's ``extra_config``: the key suffixes that
keep models and shards apart, exactly as SGLang's own file backend builds them, and the store
config with each rank's own disk folder, or the lmtier server that keeps the pages instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

from lmtier.config import DiskTierSpec, StoreConfig
from lmtier.errors import ConfigError
from lmtier.integrations.engine_config import engine_config
from lmtier.server.paths import default_socket_path

__all__ = ["MAMBA_SUFFIX", "key_suffixes", "report_interval", "server_socket", "store_config"]

MAMBA_SUFFIX = ".mamba"  # SGLang's PoolName.MAMBA: TP-sharded even for MLA models


def key_suffixes(config: HiCacheStorageConfig) -> tuple[str, str]:
    """(suffix of most keys, suffix of TP-sharded keys), exactly as ``HiCacheFile`` builds them."""
    model_name = "-".join(config.model_name.split("/")) if config.model_name else ""
    shard = f"_{config.pp_size}_{config.pp_rank}" if config.pp_size > 1 else ""
    if config.attn_cp_size > 1:
        shard += f"_cp{config.attn_cp_rank}_{config.attn_cp_size}"
    tp_suffix = f"_{model_name}_{config.tp_rank}_{config.tp_size}{shard}"
    suffix = f"_{model_name}{shard}" if config.is_mla_model else tp_suffix
    if getattr(config, "dcp_size", 1) > 1:
        dcp = (
            f"_tp{config.tp_size}_dcp{config.dcp_rank}_{config.dcp_size}"
            f"_page{config.logical_page_size}"
        )
        suffix += dcp
        tp_suffix += dcp
    return suffix, tp_suffix


def store_config(extra: Mapping[str, Any], config: HiCacheStorageConfig) -> StoreConfig:
    path, inline = extra.get("config_path"), extra.get("config")
    if path is not None and inline is not None:
        raise ConfigError("extra_config: give 'config_path' or 'config', not both")
    if inline is not None and not isinstance(inline, Mapping):
        raise ConfigError(
            f"extra_config field 'config' must be a mapping, got {type(inline).__name__}"
        )
    # Neither: $LMTIER_CONFIG.  Tiers naming no evictor get the engines' default.
    parsed = engine_config(path, inline, "extra_config['config']")
    rank_dirs = extra.get("rank_dirs", True)
    if not isinstance(rank_dirs, bool):
        raise ConfigError(f"extra_config field 'rank_dirs' must be a bool, got {rank_dirs!r}")
    if not rank_dirs:
        return parsed
    folder = (
        f"rank-tp{config.tp_rank}-pp{config.pp_rank}-dp{getattr(config, 'dp_rank', 0)}"
        f"-cp{config.attn_cp_rank}"
    )
    tiers = tuple(
        dataclasses.replace(tier, path=os.path.join(tier.path, folder))
        if isinstance(tier, DiskTierSpec)
        else tier
        for tier in parsed.tiers
    )
    return dataclasses.replace(parsed, tiers=tiers)


def server_socket(extra: Mapping[str, Any]) -> Path | None:
    """The socket of the lmtier server that keeps the pages (``"server": true`` for this user's
    default one, or a path), or None: the backend runs a store of its own."""
    server = extra.get("server", False)
    if server is True:
        return default_socket_path()
    if server is False or server is None:
        return None
    if isinstance(server, str) and server:
        return Path(server)
    raise ConfigError(
        f"extra_config field 'server' must be true, false or a socket path, got {server!r}"
    )


def report_interval(extra: Mapping[str, Any]) -> float:
    """The activity line's interval on a server (whose config the backend does not read):
    ``report_interval_s``, 60 s by default, 0 for no line."""
    interval = extra.get("report_interval_s", 60.0)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not math.isfinite(interval)
        or interval < 0
    ):
        raise ConfigError(
            f"extra_config field 'report_interval_s' must be a number >= 0, got {interval!r}"
        )
    return float(interval)
