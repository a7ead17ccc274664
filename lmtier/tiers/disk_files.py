"""A disk tier's folder on its own: entry file names, header reads, and a scan of every file.

Shared by the disk tier (reads, restart recovery) and ``lmtier inspect``; no index, no asyncio.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat as stat_module
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from lmtier import serde
from lmtier.errors import CorruptEntryError, StorageError
from lmtier.keys import CacheEngineKey, KeyLike, key_to_text
from lmtier.metadata import DiskCacheMetadata

__all__ = [
    "LOCK_NAME",
    "SUFFIX",
    "TEMP_PREFIX",
    "FolderScan",
    "FoundEntry",
    "is_shard",
    "key_digest",
    "namespace_folder",
    "open_regular",
    "open_regular_stat",
    "read_entry",
    "read_header",
    "remove_own",
    "scan_folder",
    "try_lock",
]

SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
LOCK_NAME = "LOCK"
# Enough for a header and its key in one read; longer headers take a second read.
HEADER_READ_BYTES = 4096
# Payloads larger than the CPU's cache are read and hashed in L2-sized pieces.
READ_PIECE_BYTES = 256 * 1024
PIECEWISE_ABOVE_BYTES = 4 * 1024 * 1024
_HEX = frozenset(string.hexdigits.lower())


def namespace_folder(root: Path, namespace: str, tag: str | None = None) -> Path:
    """The folder under ``root`` that holds one namespace's entries; ``tag`` (a keyed hash,
    see ``serde.EntryChecksums.name_tag``) gives each secret a folder of its own, so a tier
    opened with another secret neither serves nor drops this one's entries."""
    digest = hashlib.blake2b(namespace.encode("utf-8", "surrogatepass"), digest_size=8)
    suffix = "" if tag is None else f"-{tag}"
    return root / f"ns-{digest.hexdigest()}{suffix}"


def key_digest(key: KeyLike) -> str:
    """The hex hash that names a key's files (key text never becomes a path).

    The kind of key is hashed too: the str ``"f@m@1@0@h"`` and the ``CacheEngineKey`` of that
    text are two keys in every tier, so their names differ.
    """
    kind = "engine:" if isinstance(key, CacheEngineKey) else "str:"
    text = (kind + key_to_text(key)).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def try_lock(folder: Path, mode: int = 0o600, folder_fd: int | None = None) -> int | None:
    """Take ``folder``'s lock file: its descriptor (close it to release), or None if held.

    The lock file is made with ``mode`` if missing; a link in its place is never followed
    and, like a lock file that is not the user's own regular file, refused with
    ``StorageError``.  ``folder_fd``, an open descriptor of ``folder``, is where it is looked
    up when given.  The kernel releases an flock when its holder dies, so a crashed store
    never locks out the next one.
    """
    path = folder / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        if folder_fd is None:
            fd = os.open(path, flags, mode)
        else:
            fd = os.open(LOCK_NAME, flags, mode, dir_fd=folder_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageError(
                exc.errno, f"{path} is a symbolic link, not followed: remove it"
            ) from exc
        raise
    try:
        _check_lock_file(fd, path, mode)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_lock_file(fd: int, path: Path, mode: int) -> None:
    """Refuse a lock file that is not the user's own regular file; give it ``mode`` exactly
    (lock files of older versions were 0644, and any reader can hold an flock; a umask may
    take bits that ``mode`` asks for)."""
    found = os.fstat(fd)
    if not stat_module.S_ISREG(found.st_mode):
        raise StorageError(errno.EPERM, f"{path} is not a regular file: remove it")
    uid = os.geteuid()
    if found.st_uid != uid:
        raise StorageError(
            errno.EPERM,
            f"{path} is owned by uid {found.st_uid}, not you (uid {uid}): another user could "
            "hold it; remove it or choose another path",
        )
    if stat_module.S_IMODE(found.st_mode) != mode:
        os.fchmod(fd, mode)


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file at ``path``; ``CorruptEntryError`` for anything else.

    Never follows a symbolic link, and never waits on a FIFO or a device: a file replaced
    by one of those behind the store's back is not the entry it was.  Fits ``open``'s
    ``opener``.
    """
    return open_regular_stat(path, flags)[0]


def open_regular_stat(path: str | os.PathLike[str], flags: int) -> tuple[int, os.stat_result]:
    """``open_regular``'s descriptor and the file's status."""
    # O_NONBLOCK only keeps the open from waiting on a FIFO; it stays set, as it changes
    # nothing for a regular file's reads and writes (open(2)), and clearing it cost a restart
    # two fcntl calls per file.
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptEntryError(f"{os.fsdecode(path)}: a symbolic link, not followed") from exc
        raise
    try:
        stat = os.fstat(fd)
        if not stat_module.S_ISREG(stat.st_mode):
            raise CorruptEntryError(f"{os.fsdecode(path)}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, stat


def remove_own(path: str | os.PathLike[str]) -> bool:
    """Unlink ``path`` if it is a regular file in a real folder (not reached through a link).

    False, and nothing removed, for anything else: the tier deletes only its own files.
    """
    path = Path(path)
    try:
        if not stat_module.S_ISDIR(os.lstat(path.parent).st_mode):
            return False
        if not stat_module.S_ISREG(os.lstat(path).st_mode):
            return False
        path.unlink()
    except FileNotFoundError:
        pass
    return True


def read_header(f: BinaryIO) -> tuple[serde.EntryHeader, bytes]:
    """The header at the start of an open file, and the bytes read past it (payload start)."""
    header, head = _read_whole_header(f.read)
    return header, head[header.payload_offset :]


def _read_whole_header(read: Callable[[int], bytes]) -> tuple[serde.EntryHeader, bytes]:
    """Read a file's first bytes, more if its header is longer; the header and all read."""
    head = read(HEADER_READ_BYTES)
    need = serde.PREFIX_BYTES + serde.header_length(head)
    if len(head) < need:
        head += read(need - len(head))
    return serde.decode_header(head), head


def read_entry(
    path: str, verify: bool = True, checksums: serde.EntryChecksums | None = serde.UNKEYED
) -> tuple[serde.EntryHeader, int, int]:
    """Check a file's header (and with ``verify`` its payload); its header, size and mtime.

    Raises ``CorruptEntryError`` for a file that is not a complete, intact entry.  With
    ``checksums`` None, entries of either kind pass, and a keyed one's payload is not
    verified (that needs the secret).
    """
    # Plain descriptors: a restart reads 100k headers, and file objects cost a third more.
    fd, stat = open_regular_stat(path, os.O_RDONLY)
    try:
        header, head = _read_whole_header(lambda size: os.read(fd, size))
        if stat.st_size != header.file_size:
            raise CorruptEntryError(
                f"{path}: {stat.st_size} bytes, the header promises {header.file_size}"
            )
        if checksums is None and not header.keyed:
            checksums = serde.UNKEYED
        if checksums is not None:
            checksums.check_kind(header, path)
            if verify:
                payload = head[header.payload_offset :] + os.pread(fd, header.nbytes, len(head))
                checksums.check(header, checksums.payload_digest(payload), path)
    finally:
        os.close(fd)
    return header, stat.st_size, stat.st_mtime_ns


def metadata_for(path: str, header: serde.EntryHeader) -> DiskCacheMetadata:
    return DiskCacheMetadata(path, header.nbytes, header.shape, header.dtype, header.checksum)


class FoundEntry(NamedTuple):
    """An intact entry file of the scanned namespace."""

    key: KeyLike
    meta: DiskCacheMetadata
    file_bytes: int
    mtime_ns: int
    namespace: str = ""


@dataclass
class FolderScan:
    """What a namespace folder holds."""

    entries: list[FoundEntry] = field(default_factory=list)
    temp_files: list[Path] = field(default_factory=list)  # regular files only
    # Entry files whose bytes are wrong (a failed check, a short file): (file, why).
    corrupt: list[tuple[Path, str]] = field(default_factory=list)
    # What is not the tier's own or cannot be read now, left alone by restarts and repairs:
    # links, FIFOs, folders where files belong, unlistable shards, another namespace's
    # entries, files that failed to open for want of descriptors or permission.
    left_alone: list[tuple[Path, str]] = field(default_factory=list)


def scan_folder(
    folder: Path,
    namespace: str | None,
    verify: bool = False,
    on_file: Callable[[], object] | None = None,
) -> FolderScan:
    """Read every entry header under ``folder`` (payloads too with ``verify``).

    Entries of another namespace are left alone, unless ``namespace`` is None.  Links are
    never followed, and only regular files are opened.  ``on_file`` is called once per
    file looked at (for progress bars).  A keyed entry (written with a secret) is verified
    only as far as its header: with ``verify`` it is left alone, as its checksum needs the
    secret, and a tier's reads check it with the tier's own.
    """
    scan = FolderScan()
    if not folder.is_dir():
        return scan
    shards = []
    with os.scandir(folder) as top:
        for item in top:
            if item.name.startswith(TEMP_PREFIX):
                _found_temp(item, scan)
            elif is_shard(item.name):
                if item.is_dir(follow_symlinks=False):
                    shards.append(item.path)
                elif item.is_symlink():
                    scan.left_alone.append((Path(item.path), "a symbolic link, not followed"))
    for shard in sorted(shards):
        try:
            with os.scandir(shard) as files:
                items = list(files)
        except OSError as exc:
            scan.left_alone.append((Path(shard), f"cannot list it: {exc.strerror}"))
            continue
        for item in items:
            if item.name.startswith(TEMP_PREFIX):
                _found_temp(item, scan)
            elif item.name.endswith(SUFFIX):
                if item.is_file(follow_symlinks=False):
                    _scan_file(item.path, item.name, namespace, verify, scan)
                else:
                    scan.left_alone.append((Path(item.path), _not_regular(item)))
            if on_file is not None:
                on_file()
    return scan


def _found_temp(item: os.DirEntry[str], scan: FolderScan) -> None:
    if item.is_file(follow_symlinks=False):
        scan.temp_files.append(Path(item.path))
    else:
        scan.left_alone.append((Path(item.path), _not_regular(item)))


def _not_regular(item: os.DirEntry[str]) -> str:
    return "a symbolic link, not followed" if item.is_symlink() else "not a regular file"


def _scan_file(path: str, name: str, namespace: str | None, verify: bool, scan: FolderScan) -> None:
    try:
        header, size, mtime_ns = read_entry(path, verify, checksums=None)
    except FileNotFoundError:
        return  # removed while we looked
    except CorruptEntryError as exc:
        scan.corrupt.append((Path(path), _reason(exc, path)))
        return
    except OSError as exc:  # no evidence against the bytes (EMFILE, EACCES, EIO...)
        scan.left_alone.append((Path(path), f"cannot read it: {exc.strerror}"))
        return
    if verify and header.keyed:
        scan.left_alone.append((Path(path), "a keyed entry: its checksum needs the secret"))
        return
    if namespace is not None and header.namespace != namespace:
        why = f"namespace {header.namespace!r}, not {namespace!r}"
        scan.left_alone.append((Path(path), why))
        return
    if not name.startswith(key_digest(header.key)):
        scan.corrupt.append((Path(path), "file name does not match the key in its header"))
        return
    scan.entries.append(
        FoundEntry(header.key, metadata_for(path, header), size, mtime_ns, header.namespace)
    )


def _reason(exc: CorruptEntryError, path: str) -> str:
    """Why a file is corrupt, without the path some messages start with: the scan's pair
    already names the file, and reports print the two side by side."""
    return str(exc).removeprefix(f"{path}: ")


def is_shard(name: str) -> bool:
    """Whether a name in a tier's folder is a shard folder's (two hex digits)."""
    return len(name) == 2 and set(name) <= _HEX


def tensor_from(
    header: serde.EntryHeader,
    start: bytes,
    f: BinaryIO,
    path: str,
    out: torch.Tensor | None = None,
    checksums: serde.EntryChecksums = serde.UNKEYED,
) -> torch.Tensor:
    """Read the payload that follows a header into ``out`` (contiguous host memory of the
    entry's shape) or a new tensor, and verify its checksum with ``checksums``."""
    checksums.check_kind(header, path)  # before reading a payload that cannot verify
    tensor = torch.empty(header.shape, dtype=header.dtype) if out is None else out
    payload = serde.payload_view(tensor)
    hasher = checksums.payload_hasher()
    filled = min(len(start), header.nbytes)
    payload[:filled] = start[:filled]
    hashed = 0
    # Hashing each piece right after reading it, while it is still in the CPU's cache, saves
    # a pass over memory: 16 MiB verified reads ran 1.1-1.2x faster than read-then-hash.
    piece = READ_PIECE_BYTES if header.nbytes > PIECEWISE_ABOVE_BYTES else header.nbytes
    while filled < header.nbytes:
        got = f.readinto(payload[filled : filled + piece])  # type: ignore[attr-defined]
        if not got:
            raise CorruptEntryError(f"{path}: payload ends at {filled} of {header.nbytes} bytes")
        filled += got
        hasher.update(payload[hashed:filled])
        hashed = filled
    hasher.update(payload[hashed:])
    checksums.check(header, hasher.finish(), path)
    return tensor
