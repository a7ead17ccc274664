"""An lmtier server: one process owns the tiers; engines reach it over a Unix socket and move
block bytes through shared memory, so that no copy, read or checksum runs on their threads.

``lmtier serve --config FILE`` runs the server; ``ServerClient`` is the engine's side.
"""

from lmtier.server.client import LoadResult, ServerClient, StoreResult
from lmtier.server.paths import default_socket_path
from lmtier.server.regions import SharedRegion

__all__ = ["LoadResult", "ServerClient", "SharedRegion", "StoreResult", "default_socket_path"]
