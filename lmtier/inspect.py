"""Offline checks of a disk tier's folder: every file's header and checksum, and repairs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lmtier.errors import StorageError
from lmtier.tiers.disk_files import FolderScan, scan_folder, try_lock

__all__ = ["FolderReport", "inspect_path"]


@dataclass
class FolderReport:
    """One namespace folder: what is intact, what is not, and what a repair removed."""

    folder: Path
    namespaces: set[str] = field(default_factory=set)
    scan: FolderScan = field(default_factory=FolderScan)
    removed: int = 0

    @property
    def entries(self) -> int:
        return len(self.scan.entries)

    @property
    def payload_bytes(self) -> int:
        return sum(e.meta.size for e in self.scan.entries)

    @property
    def problems(self) -> int:
        return len(self.scan.unreadable) + len(self.scan.temp_files) - self.removed


def namespace_folders(path: Path) -> list[Path]:
    """``path`` itself if it is a namespace folder, else the namespace folders inside it."""
    if not path.is_dir():
        raise StorageError(f"{path} is not a folder")
    if path.name.startswith("ns-"):
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and p.name.startswith("ns-"))


def inspect_path(path: Path, repair: bool = False, progress: bool = False) -> list[FolderReport]:
    """Verify every entry under ``path``; with ``repair``, remove corrupt and temporary files.

    A repair takes the folder's lock, so it refuses to run beside a store using the folder.
    """
    reports = []
    for folder in namespace_folders(path):
        total = sum(len(files) for _, _, files in os.walk(folder))
        with tqdm(total=total, desc=folder.name, unit="file", disable=not progress) as bar:
            report = FolderReport(folder)
            lock = _lock(folder) if repair else None
            try:
                report.scan = scan_folder(folder, None, verify=True, on_file=lambda: bar.update())
                report.namespaces = {e.namespace for e in report.scan.entries}
                if repair:
                    for bad in [p for p, _ in report.scan.unreadable] + report.scan.temp_files:
                        bad.unlink(missing_ok=True)
                        report.removed += 1
            finally:
                if lock is not None:
                    os.close(lock)
        reports.append(report)
    return reports


def _lock(folder: Path) -> int:
    fd = try_lock(folder)
    if fd is None:
        raise StorageError(f"{folder} is in use by a running store; stop it to repair")
    return fd
