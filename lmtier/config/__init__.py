"""Store configuration: YAML plus ``LMTIER_*`` env overrides, validated into frozen dataclasses.

Each kind of tier has its spec (``MemoryTierSpec``, ``DiskTierSpec``, ``RedisTierSpec``, all
``TierSpec``), registered by kind; a field's YAML keys, check, env handling and help text live
in its metadata, so the schema is written once.
"""

from __future__ import annotations

from lmtier.config.env import CONFIG_ENV, ENV_PREFIX, LOG_LEVEL_ENV, RESERVED_ENV
from lmtier.config.env import apply_env_overrides as apply_env_overrides
from lmtier.config.loading import (
    apply_log_level,
    config_from_mapping,
    load_config,
    read_config_file,
)
from lmtier.config.store_config import (
    DEFAULT_METRICS_HOST,
    MetricsConfig,
    StoreConfig,
    parse_config,
)
from lmtier.config.tier_checks import GB, MB
from lmtier.config.tier_specs import (
    DiskTierSpec,
    MemoryTierSpec,
    RedisTierSpec,
    TierSpec,
    register_tier_kind,
    spec_class,
    tier_kinds,
)

#: The name tiers' configs had before each kind had its spec: the base, whose constructor
#: builds the spec of the kind it is given.
TierConfig = TierSpec

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_METRICS_HOST",
    "ENV_PREFIX",
    "GB",
    "LOG_LEVEL_ENV",
    "MB",
    "RESERVED_ENV",
    "DiskTierSpec",
    "MemoryTierSpec",
    "MetricsConfig",
    "RedisTierSpec",
    "StoreConfig",
    "TierConfig",
    "TierSpec",
    "apply_env_overrides",
    "apply_log_level",
    "config_from_mapping",
    "load_config",
    "parse_config",
    "read_config_file",
    "register_tier_kind",
    "spec_class",
    "tier_kinds",
]
