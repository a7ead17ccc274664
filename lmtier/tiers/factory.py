"""Tiers built from their config, with the device checks a config file cannot make."""

from __future__ import annotations

import logging

import torch

from lmtier.admission import make_admission
from lmtier.config import StoreConfig, TierConfig
from lmtier.errors import ConfigError, DeviceUnavailableError
from lmtier.evictor import BaseEvictor, make_evictor
from lmtier.tiers.base import Tier
from lmtier.tiers.disk import DiskTier
from lmtier.tiers.memory import MemoryTier

__all__ = ["build_tier", "build_tiers"]

log = logging.getLogger(__name__)


def build_tiers(config: StoreConfig) -> list[Tier]:
    """The configured tiers in cascade order, less the CUDA tiers this machine cannot hold."""
    tiers = [
        tier for spec in config.tiers if (tier := build_tier(spec, config.namespace)) is not None
    ]
    if not tiers:
        raise ConfigError("no tier is usable on this machine")
    return tiers


def build_tier(spec: TierConfig, namespace: str = "") -> Tier | None:
    """One tier, or ``None`` for a CUDA tier on a machine without CUDA that is not required."""
    tier = _build_backend(spec, namespace)
    if tier is not None:
        tier.admission = make_admission(spec.admission, spec.max_size_bytes, spec.admission_window)
    return tier


def _build_backend(spec: TierConfig, namespace: str) -> Tier | None:
    evictor = make_evictor(spec.evictor, spec.max_size_bytes)
    if spec.kind == "redis":
        return _redis_tier(spec, evictor, namespace)
    if spec.kind == "disk":
        assert spec.path is not None
        return DiskTier(spec.name, evictor, spec.path, spec.durability, namespace)
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


def _redis_tier(spec: TierConfig, evictor: BaseEvictor, namespace: str) -> Tier:
    # Imported here: redis-py is an optional extra, needed only when a redis tier is configured.
    try:
        from lmtier.tiers.remote import RemoteTier
    except ImportError as exc:
        raise ConfigError(
            f"tier {spec.name!r} is a redis tier, which needs redis-py: "
            f"pip install 'lmtier[redis]' ({exc})"
        ) from exc
    assert spec.url is not None
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
    )
