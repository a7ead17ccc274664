"""Replay a request trace through lmtier's tiers: ``lmtier replay`` (see its --help)."""

import sys

from lmtier.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["replay", *sys.argv[1:]]))
