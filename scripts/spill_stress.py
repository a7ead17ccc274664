"""Tier-spill stress with bit-exact verification: ``lmtier stress`` (see its --help)."""

import sys

from lmtier.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["stress", *sys.argv[1:]]))
