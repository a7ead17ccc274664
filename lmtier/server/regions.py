"""Shared-memory regions: a client's sealed memfd, and the server's mapping of one.

The client creates the region with ``memfd_create`` and seals its size; the descriptor goes to
the server over the socket (SCM_RIGHTS).  A memfd has no name another process could open, and
it is freed by the kernel once the last descriptor and mapping are gone, so a client killed
at any moment leaks nothing once the server drops its mapping.  The size seals matter to the
server: a region that could shrink under it would turn its next copy into a SIGBUS.

An engine that keeps its blocks in a shared-memory file of its own (vLLM's CPU tier rows)
shares that file instead (``SharedRegion.adopt``): no copy between the engine's memory and a
region, at the price of the seals.  The server takes such a file only from its own user, who
could stop the server anyway; the engine must not shrink it while it is shared (vLLM never
does: it unlinks the file, and the pages live until the last mapping goes).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat

import torch

from lmtier.errors import InvalidValueError, StorageError

__all__ = ["REQUIRED_SEALS", "SharedRegion", "map_region"]

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_MEMFD_NAME = "lmtier-region"


class SharedRegion:
    """A client's shared-memory region: a sealed memfd of ``size`` bytes, mapped as ``tensor``
    (uint8); the server reads and writes the same pages."""

    #: False for a file adopted from the engine (``adopt``): the server maps it unsealed.
    sealed = True

    def __init__(self, size: int, number: int = 0, name: str = _MEMFD_NAME) -> None:
        _check_size(size)
        self.size = size
        self.number = number
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)

    @classmethod
    def adopt(cls, fd: int, size: int, number: int = 0) -> SharedRegion:
        """The first ``size`` bytes of the caller's shared file ``fd`` (not closed: a duplicate
        is kept) as a region; unsealed, so the caller must never shrink the file."""
        _check_size(size)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidValueError(f"descriptor {fd} is not a file: it cannot be shared")
        if info.st_size < size:
            raise InvalidValueError(
                f"a shared region of {size} bytes needs a file of that size, descriptor {fd}'s "
                f"has {info.st_size}"
            )
        region = cls.__new__(cls)
        region.size, region.number, region.sealed = size, number, False
        region.fd = os.dup(fd)
        try:
            region._map = mmap.mmap(region.fd, size)
        except BaseException:
            os.close(region.fd)
            raise
        region.tensor = torch.frombuffer(region._map, dtype=torch.uint8)
        return region

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """The bytes ``[offset, offset + nbytes)`` of the region, as a uint8 tensor (no copy)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise InvalidValueError(
                f"bytes [{offset}, {offset + nbytes}) are outside the region's {self.size}"
            )
        return self.tensor[offset : offset + nbytes]

    def close(self) -> None:
        """Close the descriptor; the pages go once every view and the server's mapping do."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"SharedRegion(number={self.number}, size={self.size})"


def _check_size(size: object) -> None:
    if not isinstance(size, int) or size <= 0:
        raise InvalidValueError(f"a shared region needs a size > 0 bytes, got {size!r}")


def map_region(fd: int, size: int, sealed: bool = True) -> torch.Tensor:
    """The server's view of a client's region (uint8, ``size`` bytes); the descriptor is
    consumed.  A region that is not a regular file or is smaller than ``size`` is refused
    with StorageError; so is one that could shrink, unless ``sealed`` is False and the file
    is the server's own user's (an engine's shared file, see the module docstring)."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StorageError("a shared region must be a memfd: the descriptor is no file")
        if size <= 0 or info.st_size < size:
            raise StorageError(
                f"a shared region of {size} bytes was announced, its memfd has {info.st_size}"
            )
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if not sealed and info.st_uid != os.geteuid():
            raise StorageError(
                f"an unsealed shared file must belong to the server's user ({os.geteuid()}), "
                f"this one belongs to {info.st_uid}"
            )
        if sealed and seals & REQUIRED_SEALS != REQUIRED_SEALS:
            raise StorageError(
                "a shared region must be a memfd sealed against shrinking and growing "
                "(F_SEAL_SHRINK | F_SEAL_GROW), so that no copy can fault on a cut-off page"
            )
        mapping = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    # The tensor keeps the mapping alive; the pages are unmapped when the last view goes.
    return torch.frombuffer(mapping, dtype=torch.uint8)
