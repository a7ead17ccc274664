"""A disk tier's folder made and kept private: its modes, trusted owners, no link followed.

Folders are walked from ``/`` one component at a time with ``O_NOFOLLOW | O_DIRECTORY``, so
what is checked is what is used; missing folders are made with the tier's folder mode.  A
folder another user owns, or one that others could write in (short of the sticky-bit ``/tmp``
case, where only a folder's owner may rename or remove what is inside), is refused with what
to do about it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_module
from pathlib import Path

from lmtier.errors import ConfigError, StorageError
from lmtier.tiers.disk_files import is_shard

__all__ = [
    "DEFAULT_MODE",
    "check_links",
    "check_mode",
    "folder_mode",
    "open_tier_folder",
    "secure_shards",
]

log = logging.getLogger(__name__)

DEFAULT_MODE = 0o600
_SEARCH = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT_UID = 0


def check_mode(mode: object, tier: str) -> int:
    """``mode`` if it is a valid file mode for a tier's files, else ``ConfigError``."""
    if (
        isinstance(mode, bool)
        or not isinstance(mode, int)
        or mode & ~0o664
        or mode & 0o600 != 0o600
    ):
        shown = oct(mode) if isinstance(mode, int) and not isinstance(mode, bool) else repr(mode)
        raise ConfigError(
            f"disk tier {tier!r}: mode must hold owner read and write (0o600) and may add group "
            f"read/write and other read (e.g. 0o600, 0o640, 0o660), got {shown}"
        )
    return mode


def folder_mode(mode: int) -> int:
    """The mode of the folders that hold files of ``mode``: an execute bit for each read bit."""
    return mode | (mode & 0o444) >> 2


def check_links(path: Path) -> None:
    """Refuse a symbolic link on ``path`` (absolute, not resolved) that another user planted.

    A link of the user's own or root's (``/var -> /private/var``) is the user's choice; a link
    someone else made in a shared folder would steer the tier into a folder they chose.
    """
    uid = os.geteuid()
    where = Path(path.anchor)
    for part in path.parts[1:]:
        where = where / part
        try:
            found = os.lstat(where)
        except (FileNotFoundError, NotADirectoryError):
            return
        if stat_module.S_ISLNK(found.st_mode) and found.st_uid not in (uid, _ROOT_UID):
            raise StorageError(
                errno.EPERM,
                f"{where} is a symbolic link owned by uid {found.st_uid}, not you (uid {uid}) "
                "or root: lmtier does not follow it; remove it or choose another path",
            )


def open_tier_folder(base: Path, folder: Path, mode: int) -> int:
    """A descriptor of ``folder`` (absolute, resolved), made with its missing parents.

    Checked on the way: the folder that lmtier makes the first missing one in, ``base`` and
    every folder between (see ``_check_holder``) and ``folder`` itself (``_check_own``).
    Folders made here get ``folder_mode(mode)`` exactly, whatever the umask.
    """
    wanted = folder_mode(mode)
    checked_from = len(base.parts)
    where = Path(folder.anchor)
    fd = os.open(where, _SEARCH)
    made = False  # whether this call made the folder that ``fd`` holds
    try:
        for depth, part in enumerate(folder.parts[1:], start=2):
            parent, parent_made, where = where, made, where / part
            try:
                child = _open_folder(fd, part, where)
                made = False
            except FileNotFoundError:
                if not parent_made:
                    _check_holder(os.fstat(fd), parent, wanted)
                child, made = _make_folder(fd, part, where, wanted)
            os.close(fd)
            fd = child
            if made:
                continue
            if depth == len(folder.parts):
                _check_own(fd, where, wanted)
            elif depth >= checked_from:
                _check_holder(os.fstat(fd), where, wanted)
    except BaseException:
        os.close(fd)
        raise
    return fd


def secure_shards(folder_fd: int, folder: Path, mode: int) -> None:
    """Check each shard folder in the tier's folder as the tier's own (links are left to the
    scan, which never follows them)."""
    wanted = folder_mode(mode)
    with os.scandir(folder_fd) as items:
        shards = [i.name for i in items if is_shard(i.name) and i.is_dir(follow_symlinks=False)]
    for name in shards:
        try:
            fd = _open_folder(folder_fd, name, folder / name)
        except FileNotFoundError:
            continue
        try:
            _check_own(fd, folder / name, wanted)
        finally:
            os.close(fd)


def _open_folder(parent_fd: int, name: str, where: Path) -> int:
    try:
        return os.open(name, _SEARCH, dir_fd=parent_fd)
    except OSError as exc:
        # Linux answers ENOTDIR for a link opened with O_DIRECTORY | O_NOFOLLOW, others ELOOP.
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_link(parent_fd, name)):
            raise StorageError(
                exc.errno,
                f"{where} is a symbolic link: lmtier does not follow it; remove it or choose "
                "another path",
            ) from exc
        raise


def _is_link(parent_fd: int, name: str) -> bool:
    try:
        return stat_module.S_ISLNK(os.lstat(name, dir_fd=parent_fd).st_mode)
    except OSError:
        return False


def _make_folder(parent_fd: int, name: str, where: Path, wanted: int) -> tuple[int, bool]:
    """Make a private folder; (its descriptor, True), or (False) if another made it first."""
    try:
        os.mkdir(name, wanted, dir_fd=parent_fd)
    except FileExistsError:  # made meanwhile: checked as any folder that was there
        return _open_folder(parent_fd, name, where), False
    fd = _open_folder(parent_fd, name, where)
    try:
        os.fchmod(fd, wanted)  # the umask may have taken bits that ``mode`` asks for
    except BaseException:
        os.close(fd)
        raise
    return fd, True


def _check_holder(found: os.stat_result, where: Path, wanted: int) -> None:
    """Refuse a folder that lmtier makes its own in (or the tier's path) unless it is yours or
    root's, and others cannot write in it, or can only under the sticky bit (``/tmp``)."""
    uid = os.geteuid()
    if found.st_uid not in (uid, _ROOT_UID):
        raise StorageError(
            errno.EPERM,
            f"{where} is owned by uid {found.st_uid}, not you (uid {uid}) or root: "
            "remove it or choose another path",
        )
    loose = stat_module.S_IMODE(found.st_mode) & 0o022 & ~wanted
    if loose and not found.st_mode & stat_module.S_ISVTX:
        raise StorageError(
            errno.EPERM,
            f"{where} is writable by {_who(loose)} (mode {_mode_text(found)}) and has no sticky "
            "bit: another user could swap in a folder of theirs; make it writable by you alone "
            f"(chmod go-w {where}) or choose another path",
        )


def _check_own(fd: int, where: Path, wanted: int) -> None:
    """Refuse a tier folder that is not yours or that others can write in; take read and
    search rights beyond ``wanted`` away (folders made by older versions, 0755)."""
    uid = os.geteuid()
    found = os.fstat(fd)
    if found.st_uid != uid:
        raise StorageError(
            errno.EPERM,
            f"{where} is owned by uid {found.st_uid}, not you (uid {uid}): another user could "
            "swap entries in it or hold its lock; remove it or choose another path",
        )
    loose = stat_module.S_IMODE(found.st_mode) & 0o022 & ~wanted
    if loose:
        raise StorageError(
            errno.EPERM,
            f"{where} is writable by {_who(loose)} (mode {_mode_text(found)}): another user "
            "may have planted entries in it; remove it, or check its files and run "
            f"chmod go-w {where}, or choose another path",
        )
    extra = stat_module.S_IMODE(found.st_mode) & 0o077 & ~wanted
    if extra:
        os.fchmod(fd, stat_module.S_IMODE(found.st_mode) & ~extra)
        log.warning(
            "%s was open to %s (mode %s, as older lmtier versions made it): now %s",
            where,
            _who(extra),
            _mode_text(found),
            oct(stat_module.S_IMODE(found.st_mode) & ~extra),
        )


def _who(bits: int) -> str:
    group, other = bits & 0o070, bits & 0o007
    return "group and others" if group and other else "group" if group else "others"


def _mode_text(found: os.stat_result) -> str:
    return oct(stat_module.S_IMODE(found.st_mode))
