"""Where the server's socket lives, and the checks that keep the folder private."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from lmtier.errors import StorageError

__all__ = ["SOCKET_NAME", "check_folder", "default_socket_path", "prepare_folder"]

SOCKET_NAME = "server.sock"


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/lmtier/server.sock`` where that folder is this user's, else
    ``<tmp>/lmtier-<uid>/server.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            info = os.stat(runtime)
        except OSError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
            return Path(runtime) / "lmtier" / SOCKET_NAME
    return Path(tempfile.gettempdir()) / f"lmtier-{os.geteuid()}" / SOCKET_NAME


def check_folder(folder: Path) -> None:
    """StorageError unless ``folder`` is a real folder of this user that no one else may enter
    (a socket there could otherwise be replaced, or reached, by another user)."""
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        raise StorageError(f"the socket folder {folder} does not exist") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StorageError(
            f"the socket folder {folder} is not a folder (a symlink or a file): remove it, "
            "or choose another --socket"
        )
    if info.st_uid != os.geteuid():
        raise StorageError(
            f"the socket folder {folder} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}): remove it, or choose another --socket"
        )
    if info.st_mode & 0o077:
        raise StorageError(
            f"the socket folder {folder} is open to other users "
            f"(mode {stat.S_IMODE(info.st_mode):o}): run 'chmod 700 {folder}'"
        )


def prepare_folder(folder: Path) -> None:
    """Create ``folder`` 0700 (its parents as usual) unless it exists, then ``check_folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    check_folder(folder)
