"""Opening a disk tier's folder: lock it, check it is private, and rebuild the index from it.

What a restart does before the tier serves anything (invariant 7): take the folder's lock,
then index the entries its files hold, newest kept within the budget, and clear the files of
interrupted writes.  Apart from ``DiskTier`` because none of it runs once the tier is open.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lmtier.keys import KeyLike
from lmtier.metadata import DiskCacheMetadata
from lmtier.sizes import human_bytes
from lmtier.tiers.disk_files import FoundEntry, remove_own, scan_folder, try_lock
from lmtier.tiers.private_folder import check_links, open_tier_folder, secure_shards

__all__ = ["Recovery", "file_id", "lock_private_folder", "recover", "warn_if_short_of_room"]

# The disk tier's own logger: what opening finds is the tier's to report.
log = logging.getLogger("lmtier.tiers.disk")


@dataclass
class Recovery:
    """What opening the tier found in its folder."""

    indexed: int = 0  # entries adopted into the index
    evicted: int = 0  # intact entries over the budget, oldest first, removed
    duplicates: int = 0  # older files of a key that has a newer one, removed
    unreadable: int = 0  # what is not an intact entry of this namespace (or a link), left alone
    temp_removed: int = 0  # temporary files of interrupted writes, removed
    seconds: float = 0.0


def lock_private_folder(given_path: Path, root: Path, mode: int) -> int | None:
    """Make or check the tier's folder, its parents and shards; its lock, or None if held."""
    check_links(given_path)
    folder_fd = open_tier_folder(root.parent, root, mode)
    try:
        lock_fd = try_lock(root, mode, folder_fd)
        if lock_fd is not None:
            try:
                secure_shards(folder_fd, root, mode)
            except BaseException:
                os.close(lock_fd)
                raise
        return lock_fd
    finally:
        os.close(folder_fd)


def recover(
    root: Path, namespace: str, budget: int, tier_name: str, recovery: Recovery
) -> list[tuple[KeyLike, DiskCacheMetadata]]:
    """The entries on disk to index, least recent first (as LRU expects), newest kept within
    the budget; the others and interrupted writes are removed, and ``recovery`` counts all."""
    scan = scan_folder(root, namespace)
    recovery.temp_removed = sum(remove_own(temp) for temp in scan.temp_files)
    skipped = scan.corrupt + scan.left_alone
    recovery.unreadable = len(skipped)
    for path, why in skipped[:10]:
        log.warning("disk tier %r skipped %s: %s", tier_name, path, why)
    newest_first = sorted(scan.entries, key=lambda e: e.mtime_ns, reverse=True)
    kept: dict[KeyLike, FoundEntry] = {}
    room = budget
    for entry in newest_first:
        if entry.key in kept:
            recovery.duplicates += 1
        elif entry.meta.size <= room:
            kept[entry.key] = entry
            room -= entry.meta.size
            continue
        else:
            recovery.evicted += 1
        remove_own(entry.meta.path)
    recovery.indexed = len(kept)
    return [(key, entry.meta) for key, entry in reversed(kept.items())]


def warn_if_short_of_room(tier_name: str, budget: int, resident: int, root: Path) -> None:
    """Log a warning when the budget left exceeds the room left on the disk."""
    free = shutil.disk_usage(root).free
    if budget - resident > free:
        log.warning(
            "disk tier %r: its budget (%s, %s held) exceeds the %s free on %s; "
            "writes will fail (and fall through) once the disk is full",
            tier_name,
            human_bytes(budget),
            human_bytes(resident),
            human_bytes(free),
            root,
        )


def file_id(stat: os.stat_result) -> tuple[int, int]:
    """What tells a file apart from one that replaced it: its device and inode."""
    return stat.st_dev, stat.st_ino
