"""Starting ``lmtier serve`` for an engine that finds none: the first engine on a node starts
the server, and it keeps running for the engines after it (and across their restarts).

The server runs in a session of its own (a Ctrl-C or a SIGTERM to the engine's process group
does not reach it), with its log appended to ``<socket>.log`` beside the socket.  Engines
starting at once take turns on a lock file beside the socket: the first starts the server and
holds the lock until it answers, the others then find it answering.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from lmtier.errors import TierUnavailableError
from lmtier.server.client import ServerClient
from lmtier.server.paths import prepare_folder

__all__ = ["ensure_server", "server_pid"]

log = logging.getLogger(__name__)

# torch's import alone takes seconds on a loaded machine, a disk tier's index more.
START_TIMEOUT_S = 120.0


def server_pid(socket_path: Path, timeout: float = 5.0) -> int | None:
    """The pid of the server answering on ``socket_path``, or None if none answers."""
    with ServerClient(socket_path, timeout=timeout, send_timeout=timeout) as client:
        try:
            return client.ping(timeout)
        except TierUnavailableError:
            return None


def ensure_server(
    socket_path: Path, config_path: str | os.PathLike[str], timeout: float = START_TIMEOUT_S
) -> int:
    """The pid of a server on ``socket_path``: the one answering there, or one started with
    ``config_path``.  TierUnavailableError, naming the log, if none answers within ``timeout``."""
    pid = server_pid(socket_path)
    if pid is not None:
        return pid
    prepare_folder(socket_path.parent)
    lock_path = socket_path.with_name(socket_path.name + ".start")
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another engine may be starting one right now
        pid = server_pid(socket_path)
        return pid if pid is not None else _start(socket_path, config_path, timeout)
    finally:
        os.close(lock)


def _start(socket_path: Path, config_path: str | os.PathLike[str], timeout: float) -> int:
    log_path = socket_path.with_name(socket_path.name + ".log")
    command = [sys.executable, "-m", "lmtier", "serve", "--config", os.fspath(config_path)]
    command += ["--socket", os.fspath(socket_path)]
    with open(log_path, "ab") as log_file:
        os.chmod(log_path, 0o600)
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            close_fds=True,
        )
    log.info("lmtier: started a server (pid %d) on %s, its log in %s", process.pid, socket_path,
             log_path)  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = server_pid(socket_path, timeout=1.0)
        if pid is not None:
            return pid
        if process.poll() is not None:
            break  # it ended without serving: its log says why
        time.sleep(0.05)
    raise TierUnavailableError(
        f"no lmtier server answers on {socket_path}: the one started with {config_path} "
        f"{'exited' if process.poll() is not None else 'did not answer in time'}; see {log_path}"
    )
