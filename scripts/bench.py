"""lmtier's data paths beside raw baselines in the same run: ``lmtier bench`` (see --help)."""

import sys

from lmtier.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
