"""Tiers built from their specs through a registry of builders, one per kind of spec, with
the device checks a config file cannot make."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from lmtier.admission import make_admission
from lmtier.config import DiskTierSpec, MemoryTierSpec, RedisTierSpec, StoreConfig, TierSpec
from lmtier.errors import ConfigError, DeviceUnavailableError
from lmtier.evictor import BaseEvictor, make_evictor
from lmtier.tiers.base import Tier
from lmtier.tiers.disk import DiskTier
from lmtier.tiers.memory import MemoryTier

__all__ = ["TierBuilder", "build_tier", "build_tiers", "register_tier_builder"]

log = logging.getLogger(__name__)

S = TypeVar("S", bound=TierSpec)

TierBuilder = Callable[[S, BaseEvictor, str], Tier | None]
"""Builds the tier of a spec, given its evictor and the store's namespace; ``None`` skips a
tier this machine cannot hold."""

_BUILDERS: dict[type[TierSpec], TierBuilder[Any]] = {}


def register_tier_builder(spec_class: type[S], builder: TierBuilder[S]) -> None:
    """Build the tiers of ``spec_class`` (and of its subclasses) with ``builder``."""
    if spec_class in _BUILDERS:
        raise ConfigError(f"a builder for {spec_class.__name__} is already registered")
    _BUILDERS[spec_class] = builder


def _builder(spec: TierSpec) -> TierBuilder[Any]:
    for cls in type(spec).__mro__:
        if cls in _BUILDERS:
            return _BUILDERS[cls]
    raise ConfigError(f"tier {spec.name!r}: no builder is registered for {type(spec).__name__}")


def build_tiers(config: StoreConfig) -> list[Tier]:
    """The configured tiers in cascade order, less the CUDA tiers this machine cannot hold."""
    tiers = [
        tier for spec in config.tiers if (tier := build_tier(spec, config.namespace)) is not None
    ]
    if not tiers:
        raise ConfigError("no tier is usable on this machine")
    return tiers


def build_tier(spec: TierSpec, namespace: str = "") -> Tier | None:
    """One tier, or ``None`` for a CUDA tier on a machine without CUDA that is not required."""
    evictor = make_evictor(spec.evictor, spec.max_size_bytes)
    tier = _builder(spec)(spec, evictor, namespace)
    if tier is not None:
        tier.admission = make_admission(spec.admission, spec.max_size_bytes, spec.admission_window)
    return tier


def _memory_tier(spec: MemoryTierSpec, evictor: BaseEvictor, namespace: str) -> Tier | None:
    device = torch.device(spec.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            if spec.required:
                raise DeviceUnavailableError(
                    f"tier {spec.name!r} requires {spec.device} but CUDA is not available"
                )
            log.warning("tier %r skipped: CUDA is not available on this machine", spec.name)
            return None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"tier {spec.name!r}: {spec.device} does not exist "
                f"({torch.cuda.device_count()} CUDA device(s))"
            )
    return MemoryTier(spec.name, evictor, device, pinned=spec.pinned)


def _disk_tier(spec: DiskTierSpec, evictor: BaseEvictor, namespace: str) -> Tier:
    return DiskTier(
        spec.name,
        evictor,
        spec.path,
        spec.durability,
        namespace,
        spec.mode,
        auth_key=_revealed(spec),
    )


def _redis_tier(spec: RedisTierSpec, evictor: BaseEvictor, namespace: str) -> Tier:
    # Imported here: redis-py is an optional extra, needed only when a redis tier is configured.
    try:
        from lmtier.tiers.remote import RemoteTier
    except ImportError as exc:
        raise ConfigError(
            f"tier {spec.name!r} is a redis tier, which needs redis-py: "
            f"pip install 'lmtier[redis]' ({exc})"
        ) from exc
    return RemoteTier(
        spec.name,
        evictor,
        spec.url,
        namespace=namespace,
        key_prefix=spec.key_prefix,
        username=spec.username,
        password=spec.password,
        cluster=spec.cluster,
        connect_timeout_s=spec.connect_timeout_s,
        op_timeout_s=spec.op_timeout_s,
        reconnect_max_s=spec.reconnect_max_s,
        tls_files=(spec.tls_ca_file, spec.tls_cert_file, spec.tls_key_file),
        auth_key=_revealed(spec),
    )


def _revealed(spec: DiskTierSpec | RedisTierSpec) -> bytes | None:
    return None if spec.auth_key is None else spec.auth_key.reveal()


register_tier_builder(MemoryTierSpec, _memory_tier)
register_tier_builder(DiskTierSpec, _disk_tier)
register_tier_builder(RedisTierSpec, _redis_tier)
