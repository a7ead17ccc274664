"""When the machine makes a bench run unreliable: its load, rows that spread, a folder in memory.

The rule (docs/benchmarks.md): a run is flagged when the 1-minute load average is above the
number of cores at its start or at its end (other work then takes turns with the bench's
threads, and a row that hops threads pays for it), or when the middle half of a row's
repetitions (first to third quartile, on either side of the row) spans more than
``SPREAD_LIMIT`` of their median.  The quartiles rather than the extremes: on a shared machine
nearly every row has an odd slow sample, which its median ignores; a wide middle half means
the median itself moved.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lmtier.cli.bench.core import Row

__all__ = [
    "MEMORY_FILESYSTEMS",
    "SPREAD_LIMIT",
    "LoadWatch",
    "filesystem_type",
    "folder_warning",
    "spread_warning",
]

SPREAD_LIMIT = 0.5
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
PROC_MOUNTS = Path("/proc/mounts")


class LoadWatch:
    """The load average at the start of a run and at each ``sample()``, judged against the
    number of cores."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.samples: list[tuple[str, float]] = []
        self.sample("start")

    def sample(self, when: str = "end") -> None:
        self.samples.append((when, os.getloadavg()[0]))

    def warning(self) -> str | None:
        """One line naming the moments the load was above the core count, or None."""
        high = [f"{load:.2f} at the {when}" for when, load in self.samples if load > self.cores]
        if not high:
            return None
        return (f"warning: load average {', '.join(high)}, above the {self.cores} cores: other "
                "work shared the CPUs with this run and its figures are unreliable (rows that "
                "hop threads suffer most); rerun on a quiet machine")  # fmt: skip


def spread_warning(rows: Sequence[Row], limit: float = SPREAD_LIMIT) -> str | None:
    """One line naming the rows whose middle half of repetitions spans over ``limit`` of their
    median."""
    wide = [row.name for row in rows if row.middle_spread > limit]
    if not wide:
        return None
    return (f"warning: in {len(wide)} of {len(rows)} rows the middle half of the repetitions "
            f"spans over {limit:.0%} of their median: {'; '.join(wide)}; their ratios are "
            "unreliable, rerun them or use --repeat")  # fmt: skip


def filesystem_type(path: Path, mounts_file: Path = PROC_MOUNTS) -> str | None:
    """The type of the filesystem holding ``path`` (from /proc/mounts), or None if unknown."""
    try:
        mounts = mounts_file.read_text().splitlines()
    except OSError:
        return None  # not Linux, or no /proc: nothing to tell
    resolved = path.resolve()
    best: tuple[int, str] | None = None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = Path(fields[1].replace("\\040", " "))
        if (resolved == mount or mount in resolved.parents) and (
            best is None or len(mount.parts) >= best[0]
        ):
            best = (len(mount.parts), fields[2])  # the deepest mount wins; the last of equals
    return None if best is None else best[1]


def folder_warning(folder: Path) -> str | None:
    """A line if ``folder`` (where disk rows write) is in memory rather than on a disk."""
    kind = filesystem_type(folder)
    if kind not in MEMORY_FILESYSTEMS:
        return None
    return (f"warning: {folder} is on {kind}, in memory: disk rows would measure memory copies, "
            "not a disk; pass --folder on a real disk (e.g. /var/tmp)")  # fmt: skip
