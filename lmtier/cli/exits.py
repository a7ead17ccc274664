"""Exit statuses of the ``lmtier`` command, as shells and job schedulers read them."""

from __future__ import annotations

__all__ = ["INTERRUPTED", "USAGE_ERROR"]

# A missing command is a usage error, as argparse reports every other one.
USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
