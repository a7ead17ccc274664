"""``lmtier serve``: one store behind a Unix socket, in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from lmtier.cli.argtypes import user_path
from lmtier.config import load_config
from lmtier.server.paths import default_socket_path
from lmtier.server.process import serve

__all__ = ["add_serve_parser", "run_serve"]


def add_serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve_parser = commands.add_parser(
        "serve",
        help="serve one store to this user's engine processes over a Unix socket",
        description="Opens the configured tiers and serves them over a Unix socket (0600, in a "
        "0700 folder of this user) until SIGTERM or SIGINT, then closes the store cleanly. "
        "Only processes of the same user may connect; block bytes move through shared memory "
        "that the clients pass to the server (docs/server.md).",
    )
    serve_parser.add_argument(
        "--config", type=user_path, required=True, help="the store config YAML"
    )
    serve_parser.add_argument(
        "--socket", type=user_path, metavar="PATH",
        help=f"the socket's path (default: {default_socket_path()})",
    )  # fmt: skip
    serve_parser.set_defaults(run=run_serve, no_progress=True)


def run_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    path = Path(args.socket) if args.socket else default_socket_path()

    def ready(where: Path) -> None:
        print(f"lmtier: serving on {where}", file=sys.stderr, flush=True)

    asyncio.run(serve(config, path, ready))
    return 0
