"""The checks of tier fields that need more than a type: sizes, devices, URLs, files, modes,
and secrets read from a file or the environment."""

from __future__ import annotations

import os
import stat
from typing import Any
from urllib.parse import urlsplit

import torch

from lmtier.config.fields import Place, number, text
from lmtier.secret import Secret, redact_url

__all__ = [
    "GB",
    "MB",
    "SIZE_KEYS",
    "auth_key",
    "device",
    "existing_file",
    "file_mode",
    "folder",
    "redis_url",
    "size_bytes",
]

GB = 1024**3
MB = 1024**2
_UNITS = {"max_size_gb": GB, "max_size_mb": MB}
SIZE_KEYS = tuple(_UNITS)
_REDIS_SCHEMES = ("redis", "rediss")


def size_bytes(value: Any, place: Place) -> int:
    """A budget in GB or MB (the key says which), as a whole number of bytes > 0."""
    amount = number(value, place)
    size = int(amount * _UNITS[place.key])
    if size <= 0:
        raise place.error(f"must be finite and over 0 bytes, got {amount!r}")
    return size


def device(value: Any, place: Place) -> str:
    name = text()(value, place)
    try:
        parsed = torch.device(name)
    except RuntimeError as exc:
        raise place.error(f"{name!r} is not a device: {exc}") from exc
    # "cpu:0" parses, but a tier's cpu memory has no index to mean anything by it.
    if parsed.type not in ("cpu", "cuda") or (parsed.type == "cpu" and parsed.index is not None):
        raise place.error(f"must be cpu, cuda or cuda:N, got {name!r}")
    return str(parsed)


def folder(value: Any, place: Place) -> str:
    """A folder's path, ~ expanded."""
    return os.path.expanduser(text(nonempty=True)(value, place))


def redis_url(value: Any, place: Place) -> str:
    """redis:// or rediss:// with a host; a password in it never shows in an error."""
    url = text()(value, place)
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise place.error(f"{shown!r} is not a URL: {exc}") from None
    if parts.scheme not in _REDIS_SCHEMES or not parts.hostname:
        raise place.error(
            f"must be redis://HOST[:PORT] or rediss://HOST[:PORT] (TLS), got {shown!r}"
        )
    return url


def existing_file(value: Any, place: Place) -> str:
    """A file's path, ~ expanded, that names a file now (a typo shows here, not later)."""
    path = os.path.expanduser(text()(value, place))
    if not os.path.isfile(path):
        raise place.about(f"no file at {path!r}")
    return path


def file_mode(value: Any, place: Place) -> int:
    """An octal mode: ``0o640``, ``"0640"`` or YAML's own octal ``0640``; user and group bits
    only, and the user can read and write."""
    if isinstance(value, str):
        digits = value.strip().lower().removeprefix("0o")
        if not digits or any(c not in "01234567" for c in digits):
            raise place.error(f"must be an octal mode such as 0o600 or '0640', got {value!r}")
        mode = int(digits, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise place.wrong_type("an octal mode such as 0o600 or '0640'", value)
    if mode & ~0o770 or mode < 0:
        hint = f" (YAML read {value!r} as a decimal number: write 0o{value} or '0{value}')"
        raise place.error(
            f"may give only user and group bits (0o770 at most), got {oct(mode)}"
            + (hint if isinstance(value, int) and set(str(value)) <= set("01234567") else "")
        )
    if mode & 0o600 != 0o600:
        raise place.error(f"must let the user read and write (0o600), got {oct(mode)}")
    return mode


def auth_key(value: Any, place: Place) -> Secret:
    """The secret named by ``auth_key_file`` (a file only its owner can read) or
    ``auth_key_env`` (a variable set and not empty); its bytes never show in an error."""
    name = text(nonempty=True)(value, place)
    if place.key == "auth_key_env":
        found = place.environ.get(name)
        if found is None:
            raise place.about(f"environment variable {name!r} is not set")
        if not found:
            raise place.about(f"environment variable {name!r} is empty")
        return Secret(os.fsencode(found))
    return _key_file(os.path.expanduser(name), place)


def _key_file(path: str, place: Place) -> Secret:
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the load.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise place.about(f"no file at {path!r}") from None
    except OSError as exc:
        raise place.about(f"cannot open {path!r}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise place.about(f"{path!r} is not a regular file")
        if info.st_mode & 0o077:
            raise place.about(
                f"{path!r} is open to group or others (mode {oct(info.st_mode & 0o777)}); "
                f"a secret must be readable by its owner only: chmod 600 {path}"
            )
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read()
    except OSError as exc:
        raise place.about(f"cannot read {path!r}: {exc.strerror}") from None
    finally:
        os.close(fd)
    # One line ending goes, as `$(cat file)` drops it: the file and a variable filled from it
    # give the same secret.
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    if not data:
        raise place.about(f"{path!r} is empty")
    return Secret(data)
