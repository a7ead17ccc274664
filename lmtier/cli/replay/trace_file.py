"""A trace file's lines as text: a regular UTF-8 file or a clear error naming it."""

from __future__ import annotations

import codecs
import errno
import io
import itertools
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from lmtier.errors import TraceError
from lmtier.sizes import human_bytes

__all__ = ["MAX_LINE_BYTES", "trace_lines"]

#: The longest line a trace may have.  A request of 128k tokens in 16-token blocks is ~80 KB
#: of JSON; a "line" far longer is a file that is not JSONL, and reading it whole would
#: exhaust memory before any error could be shown.
MAX_LINE_BYTES = 16 * 2**20

_SNIFF_BYTES = 64 * 1024
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
# Byte-order marks, UTF-32 first: its little-endian mark begins with UTF-16's.
_WIDE_TEXT = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def trace_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Each non-blank line of ``path`` with its 1-based number, decoded as UTF-8.

    Raises TraceError naming ``path`` for a missing or unreadable file, anything but a regular
    file (a FIFO is refused without waiting for a writer), an empty file, and bytes that are
    not UTF-8 text (a compressed or binary file).
    """
    with _open_regular(path) as handle:
        _sniff(path, handle.peek(_SNIFF_BYTES)[:_SNIFF_BYTES])
        for number in itertools.count(1):
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise TraceError(
                    f"{path}:{number}: a line longer than {human_bytes(MAX_LINE_BYTES)}; "
                    "a trace has one JSON request per line"
                )
            try:
                # utf-8-sig on the first line: an editor's byte-order mark is not an error.
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                why = _undecodable(raw[exc.start], exc.start)
                raise _not_text(path, f"line {number}: {why}") from None
            if "\x00" in line:
                raise _not_text(path, f"line {number}: a NUL byte at offset {raw.index(0)}")
            if line.strip():
                yield number, line


def _open_regular(path: Path) -> io.BufferedReader:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; it is
    # refused after fstat, and has no effect on a regular file's reads.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # how opening a socket fails
            raise TraceError(f"{path} is a socket, not a trace file") from None
        raise TraceError(f"{path}: cannot read the trace: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise TraceError(f"{path} is {kind}, not a trace file: give a JSONL file")
        if info.st_size == 0:
            raise TraceError(f"{path} is empty: a trace has one JSON request per line")
        os.set_blocking(fd, True)
        # A buffer as large as the sniffed head, so that peek returns all of it.
        return io.BufferedReader(io.FileIO(fd, "rb"), buffer_size=_SNIFF_BYTES)
    except BaseException:
        os.close(fd)
        raise


def _sniff(path: Path, head: bytes) -> None:
    """Refuse a binary file from its first bytes, before reading it line by line."""
    for magic, name in _COMPRESSED.items():
        if head.startswith(magic):
            raise _not_text(path, f"it starts like a {name} file; decompress it first")
    for mark, name in _WIDE_TEXT.items():
        if head.startswith(mark):
            raise _not_text(path, f"it is {name} text; convert it to UTF-8")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        line, offset = _line_of(head, exc.start)
        raise _not_text(path, f"line {line}: {_undecodable(head[exc.start], offset)}") from None
    if b"\x00" in head:
        line, offset = _line_of(head, head.index(0))
        raise _not_text(path, f"line {line}: a NUL byte at offset {offset}")


def _line_of(data: bytes, index: int) -> tuple[int, int]:
    """The 1-based line of ``data[index]`` and its 0-based offset in that line."""
    return data.count(b"\n", 0, index) + 1, index - (data.rfind(b"\n", 0, index) + 1)


def _undecodable(byte: int, offset: int) -> str:
    return f"byte 0x{byte:02x} at offset {offset} is not UTF-8"


def _not_text(path: Path, why: str) -> TraceError:
    return TraceError(f"{path} is not a UTF-8 text trace: {why}")
