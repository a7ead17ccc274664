"""The HTTP endpoint a Prometheus server scrapes: started at a store's open, stopped at close."""

from __future__ import annotations

import errno
import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from lmtier.errors import ConfigError

__all__ = ["MetricsServer"]


class MetricsServer:
    """prometheus_client's threaded HTTP server over one registry, on ``host:port``.

    The config's ``host`` is loopback unless it names another address. Port 0 takes any free
    port; ``port`` tells which, and ``host`` the address the socket is bound to. A port that
    cannot be had (in use, or privileged) is a ``ConfigError`` naming it.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            server, thread = start_http_server(port, host, registry)
        except OSError as exc:
            where = f"metrics: cannot serve on {host}:{port}"
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{where}: port {port} is in use; choose another port, or 0 for any free one"
                ) from exc
            raise ConfigError(f"{where}: {exc}") from exc
        self._server: Any = server
        self._thread: threading.Thread = thread
        self.host: str = str(server.server_address[0])
        self.port: int = server.server_port

    def stop(self) -> None:
        """Stop serving and release the port; blocks up to the server's poll interval."""
        self._server.shutdown()
        self._server.server_close()  # without it the port stays bound
        self._thread.join()
