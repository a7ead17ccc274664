"""The shared file behind a piece of this process's memory, so that an engine's own shared
memory (vLLM keeps its CPU tier's rows in a file under /dev/shm, unlinked once mapped) can be
handed to the server as it is, with no copy and no change to the engine.

Read from ``/proc/self/maps``: the mapping that holds the address names the file's device and
inode and the offset the mapping starts at; an open descriptor of this process on the same
file is duplicated (the engine keeps one), else the mapping itself is opened through
``/proc/self/map_files``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from lmtier.errors import InvalidValueError

__all__ = ["MappedFile", "mapped_file"]


@dataclass(frozen=True)
class MappedFile:
    """A descriptor of the file (the caller closes it) and the file offset of the address."""

    fd: int
    offset: int


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    shared: bool
    file_offset: int
    device: tuple[int, int]
    inode: int


def mapped_file(address: int, length: int) -> MappedFile:
    """The shared file mapped at ``[address, address + length)``; InvalidValueError when that
    memory is not one shared mapping of a file (anonymous or private memory)."""
    mapping = _mapping_of(address, length)
    if mapping.inode == 0 or not mapping.shared:
        raise InvalidValueError(
            f"the memory at {address:#x} is not a shared file mapping: it cannot be shared with "
            "the server in place"
        )
    offset = mapping.file_offset + (address - mapping.start)
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile, or the listing's own descriptor
        device = (os.major(info.st_dev), os.minor(info.st_dev))
        if stat.S_ISREG(info.st_mode) and (device, info.st_ino) == (mapping.device, mapping.inode):
            return MappedFile(os.dup(int(name)), offset)
    try:
        fd = os.open(
            f"/proc/self/map_files/{mapping.start:x}-{mapping.end:x}", os.O_RDWR | os.O_CLOEXEC
        )
    except OSError as exc:
        raise InvalidValueError(
            f"no open descriptor of the file mapped at {address:#x}, and the mapping cannot be "
            f"opened: {exc}"
        ) from exc
    return MappedFile(fd, offset)


def _mapping_of(address: int, length: int) -> _Mapping:
    """The mapping holding the range; adjacent mappings of one file at consecutive offsets
    (a mapping the kernel split) count as one."""
    found: _Mapping | None = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            mapping = _parse(line)
            if found is not None and _continues(found, mapping):
                found = _Mapping(
                    found.start, mapping.end, found.shared, found.file_offset, found.device,
                    found.inode,
                )  # fmt: skip
            elif mapping.start <= address < mapping.end:
                found = mapping
            elif found is not None:
                break
            if found is not None and address + length <= found.end:
                return found
    raise InvalidValueError(
        f"the memory [{address:#x}, {address + length:#x}) is not one mapping of this process"
    )


def _parse(line: str) -> _Mapping:
    fields = line.split(maxsplit=5)
    start, end = (int(part, 16) for part in fields[0].split("-"))
    major, minor = (int(part, 16) for part in fields[3].split(":"))
    return _Mapping(start, end, fields[1][3] == "s", int(fields[2], 16), (major, minor),
                    int(fields[4]))  # fmt: skip


def _continues(first: _Mapping, then: _Mapping) -> bool:
    return (
        then.start == first.end
        and (then.device, then.inode, then.shared) == (first.device, first.inode, first.shared)
        and then.file_offset == first.file_offset + (first.end - first.start)
    )
