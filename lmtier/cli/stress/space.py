"""A stress run's own corner of the configured storage, removed when the run ends.

The run gets a namespace nobody else uses, so its disk tiers write into a sub-folder of their
own and its redis tiers under a key prefix of their own; whatever else the configured folders
and servers hold is never read, overwritten or deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import shutil
from pathlib import Path

from lmtier import serde
from lmtier.config import DiskTierSpec, RedisTierSpec, StoreConfig, TierConfig
from lmtier.errors import LmtierError
from lmtier.tiers.disk_files import namespace_folder
from lmtier.tiers.factory import build_tier

__all__ = ["StressSpace"]


class StressSpace:
    """``config`` moved into a fresh namespace; ``remove`` deletes all the run wrote there."""

    def __init__(self, config: StoreConfig) -> None:
        token = secrets.token_hex(6)
        self.namespace = f"lmtier-stress-{token}"
        tiers = []
        for spec in config.tiers:
            if isinstance(spec, RedisTierSpec) and spec.key_prefix is not None:
                # A configured prefix may be all an ACL lets this user write: stay beneath it.
                spec = dataclasses.replace(spec, key_prefix=f"{spec.key_prefix}:stress-{token}")
            tiers.append(spec)
        self.config = dataclasses.replace(config, namespace=self.namespace, tiers=tuple(tiers))
        disks = [spec for spec in tiers if isinstance(spec, DiskTierSpec)]
        disk_roots = [_root(spec) for spec in disks]
        #: Each disk tier's sub-folder for this run.
        self.folders = [
            namespace_folder(_root(spec), self.namespace, _tag(spec, self.namespace))
            for spec in disks
        ]
        # Configured folders that the run's store will create: removed too, if left empty.
        self._new_folders = sorted(
            {folder for root in disk_roots for folder in _missing(root)},
            key=lambda folder: len(folder.parts),
            reverse=True,
        )

    async def remove(self) -> list[str]:
        """Delete the run's disk sub-folders and redis values; what could not be removed."""
        failures = []
        for folder in self.folders:
            try:
                shutil.rmtree(folder)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failures.append(f"could not remove {folder}: {exc.strerror or exc}")
        for folder in self._new_folders:
            with contextlib.suppress(OSError):  # not empty: something else put files there
                folder.rmdir()
        for spec in self.config.tiers:
            if spec.kind == "redis":
                failure = await _clear_redis(spec, self.namespace)
                if failure:
                    failures.append(failure)
        return failures


async def _clear_redis(spec: TierConfig, namespace: str) -> str | None:
    """Delete the values under the run's key prefix on ``spec``'s server (with a connection of
    its own: the run's store is closed by now); why that failed, or None."""
    from lmtier.tiers.remote import RemoteTier  # a redis tier was configured: redis-py is there

    tier = build_tier(spec, namespace)
    assert isinstance(tier, RemoteTier)
    try:
        await tier.open()
        await tier.clear_prefix()
    except LmtierError as exc:
        return f"could not delete the values under {tier.key_prefix!r}: {exc}"
    finally:
        await tier.close()
    return None


def _root(spec: DiskTierSpec) -> Path:
    return Path(spec.path).expanduser().resolve()  # as the disk tier resolves it


def _missing(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _tag(spec: DiskTierSpec, namespace: str) -> str | None:
    """The secret's tag in the folder's name, as the tier derives it."""
    secret = None if spec.auth_key is None else spec.auth_key.reveal()
    return serde.EntryChecksums(secret).name_tag(namespace)
