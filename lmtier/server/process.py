"""The server's process: its listening socket, and ``serve``, which opens the store, serves it
(``lmtier.server.service.Server``) until SIGTERM or SIGINT, then closes both cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import torch

from lmtier.config import StoreConfig
from lmtier.errors import StorageError
from lmtier.server.paths import prepare_folder
from lmtier.server.service import Server
from lmtier.store import TieredStore

__all__ = ["bind", "serve"]

# The service's logger: the server's lines keep the name users filter on.
log = logging.getLogger("lmtier.server.service")


def bind(path: Path) -> socket.socket:
    """A listening socket at ``path`` (0600, in a private folder); a stale socket file left
    by a server that died is replaced, a live server's is not."""
    prepare_folder(path.parent)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # nobody listens: a dead server's leftover
        else:
            raise StorageError(f"an lmtier server is already serving on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # the socket file is created 0600, never wider for a moment
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(128)
    listener.setblocking(False)
    return listener


async def serve(config: StoreConfig, path: Path, ready: Any = None) -> None:
    """Open the store, serve it on ``path`` until SIGTERM or SIGINT, then close it cleanly.

    ``ready`` (a callable) is called with the socket's path once it accepts connections."""
    # The server's copies are many small ones on a node whose cores belong to the engines:
    # fanned out over intra-op threads, a 256 KiB copy waited ~10 ms on a busy 2-core
    # machine for a thread that was not scheduled, against ~0.2 ms on the calling thread.
    torch.set_num_threads(1)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    store = TieredStore(config)
    try:
        await store.open()
        server = Server(store, bind(path), path)
        server.start()
        log.info("lmtier server: serving on %s (pid %d)", path, os.getpid())
        if ready is not None:
            ready(path)
        try:
            await stop.wait()
        finally:
            log.info("lmtier server: stopping")
            await server.close()
    finally:
        await store.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
