"""Secrets that never print: a key held as bytes, and URLs with their password masked."""

from __future__ import annotations

import hmac
import re

__all__ = ["Secret", "redact_url", "redact_urls"]

MASK = "***"

# scheme://user:password@ in free text; the password runs to the last "@" before a space.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:@/]*):[^\s]*@")


class Secret:
    """Bytes that ``repr``, ``str`` and f-strings show as ``Secret('***')``.

    ``reveal()`` hands the bytes to the one place that uses them. Two secrets compare equal
    when their bytes do, in time that does not depend on where they differ.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"a Secret holds bytes, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(Secret)  # the same for every secret: a hash would tell about the bytes


def redact_url(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part, if any, masked."""
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:{MASK}@{host}"


def redact_urls(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it masked."""
    return _URL_PASSWORD.sub(rf"\1:{MASK}@", text)
