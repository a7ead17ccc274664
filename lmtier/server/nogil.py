"""Non-blocking send and recv that keep the GIL.

Python's socket calls release the GIL around every system call; in a process whose other
thread runs Python without a pause (an engine's loop), taking it back waits up to the switch
interval (5 ms).  A send or recv with MSG_DONTWAIT never blocks, so the client's engine-thread
calls make them through libc with the GIL held: a microsecond instead of a switch interval.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket

__all__ = ["Receiver", "send_now"]

_libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_send = _libc.send
_send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
_send.restype = ctypes.c_ssize_t
_recv = _libc.recv
_recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_recv.restype = ctypes.c_ssize_t
_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_AGAIN = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR}


def send_now(fd: int, data: bytes) -> int:
    """Bytes of ``data`` sent at once (0 when the socket's buffer is full); OSError else."""
    sent = _send(fd, data, len(data), _FLAGS)
    if sent >= 0:
        return int(sent)
    code = ctypes.get_errno()
    if code in _AGAIN:
        return 0
    raise OSError(code, f"send: {errno.errorcode.get(code, code)}")


class Receiver:
    """recv into a buffer of its own: the bytes that were there, b'' at the peer's end, None
    when nothing waits."""

    def __init__(self, size: int = 1 << 16) -> None:
        self._buffer = ctypes.create_string_buffer(size)
        self._size = size

    def __call__(self, fd: int) -> bytes | None:
        got = _recv(fd, self._buffer, self._size, _FLAGS)
        if got > 0:
            return ctypes.string_at(self._buffer, got)
        if got == 0:
            return b""
        code = ctypes.get_errno()
        if code in _AGAIN:
            return None
        raise OSError(code, f"recv: {errno.errorcode.get(code, code)}")
