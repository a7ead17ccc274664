"""``lmtier inspect``: offline checks of a disk tier's folder (every file's header and
checksum) and repairs."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lmtier.errors import StorageError
from lmtier.sizes import human_bytes
from lmtier.tiers.disk_files import (
    FolderScan,
    FoundEntry,
    namespace_folder,
    remove_own,
    scan_folder,
    try_lock,
)

__all__ = ["FolderReport", "inspect_command", "inspect_path"]


@dataclass
class FolderReport:
    """One namespace folder: what is intact, what is not, and what a repair removed."""

    folder: Path
    namespaces: set[str] = field(default_factory=set)
    scan: FolderScan = field(default_factory=FolderScan)  # its entries: the folder's namespace
    foreign: list[FoundEntry] = field(default_factory=list)  # intact, of another namespace
    removed: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)  # a repair could not remove

    @property
    def entries(self) -> int:
        return len(self.scan.entries)

    @property
    def payload_bytes(self) -> int:
        return sum(e.meta.size for e in self.scan.entries)

    @property
    def problems(self) -> int:
        scan = self.scan
        found = len(scan.corrupt) + len(scan.temp_files) + len(scan.left_alone)
        return found + len(self.foreign) - self.removed


def namespace_folders(path: Path) -> list[Path]:
    """``path`` itself if it is a namespace folder, else the namespace folders inside it (one
    at least: a folder without any is not a disk tier's)."""
    if not path.is_dir():
        raise StorageError(f"{path} is not a folder")
    if path.name.startswith("ns-"):
        return [path]
    folders = sorted(
        p for p in path.iterdir() if p.name.startswith("ns-") and p.is_dir() and not p.is_symlink()
    )
    if not folders:
        raise StorageError(
            f"{path} is not a disk tier's folder: it holds no ns-* folder (give the path a disk "
            "tier is configured with, or one of its ns-* folders)"
        )
    return folders


def inspect_path(path: Path, repair: bool = False, progress: bool = False) -> list[FolderReport]:
    """Verify every entry under ``path``; with ``repair``, remove corrupt and temporary files.

    A repair takes the folder's lock, so it refuses to run beside a store using the folder.
    It removes only regular files of the folder's own: links, FIFOs, unreadable files and
    another namespace's entries are reported and left alone.
    """
    reports = []
    for folder in namespace_folders(path):
        try:
            reports.append(_inspect_folder(folder, repair, progress))
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot inspect {folder}: {exc}") from exc
    return reports


def inspect_command(args: argparse.Namespace) -> int:
    """Print one report per namespace folder; 1 while any problem remains."""
    reports = inspect_path(args.path, repair=args.repair, progress=args.progress)
    for report in reports:
        scan = report.scan
        names = ", ".join(repr(n) for n in sorted(report.namespaces)) or "-"
        print(
            f"{report.folder}: {report.entries} entries, {human_bytes(report.payload_bytes)} "
            f"(namespace {names}); {len(scan.corrupt)} corrupt, "
            f"{len(report.foreign)} of another namespace, {len(scan.left_alone)} left alone, "
            f"{len(scan.temp_files)} temporary"
        )
        for bad, why in scan.corrupt:
            print(f"  corrupt  {bad}: {why}")
        for entry in report.foreign:
            print(f"  foreign  {entry.meta.path}: namespace {entry.namespace!r}")
        for other, why in scan.left_alone:
            print(f"  skipped  {other}: {why}")
        for temp in scan.temp_files:
            print(f"  temp     {temp}")
        if args.repair:
            print(f"  repaired: removed {report.removed} file(s)")
            for bad, why in report.failed:
                print(f"  could not remove {bad}: {why}")
    return 1 if any(report.problems for report in reports) else 0


def _inspect_folder(folder: Path, repair: bool, progress: bool) -> FolderReport:
    total = sum(len(files) for _, _, files in os.walk(folder))
    with tqdm(total=total, desc=folder.name, unit="file", disable=not progress) as bar:
        report = FolderReport(folder)
        lock = _lock(folder) if repair else None
        try:
            scan = scan_folder(folder, None, verify=True, on_file=lambda: bar.update())
            # The folder's name is its namespace's hash: entries of any other are foreign.
            own = {e.namespace for e in scan.entries if _names(e.namespace, folder)}
            report.namespaces = own
            report.foreign = [e for e in scan.entries if e.namespace not in own]
            scan.entries = [e for e in scan.entries if e.namespace in own]
            report.scan = scan
            if repair:
                for bad in [p for p, _ in scan.corrupt] + scan.temp_files:
                    try:
                        report.removed += remove_own(bad)
                    except OSError as exc:
                        report.failed.append((bad, exc.strerror or str(exc)))
        finally:
            if lock is not None:
                os.close(lock)
    return report


def _names(namespace: str, folder: Path) -> bool:
    """Whether ``folder`` is ``namespace``'s, without a secret's tag or with one."""
    name = namespace_folder(Path(), namespace).name
    return folder.name == name or folder.name.startswith(name + "-")


def _lock(folder: Path) -> int:
    try:
        fd = try_lock(folder)
    except OSError as exc:
        raise StorageError(
            exc.errno, f"cannot lock {folder} to repair it: {exc.strerror or exc}"
        ) from exc
    if fd is None:
        raise StorageError(f"{folder} is in use by a running store; stop it to repair")
    return fd
