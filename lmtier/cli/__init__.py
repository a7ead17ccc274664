"""The ``lmtier`` command and its tools, on a floor of their own above the library.

``main`` builds the parser and runs a command; each command lives beside the code it drives:
``stress`` (concurrent tasks overfill the tiers and check every entry), ``replay`` (request
traces through the tiers, beside OPT), ``inspect`` (a disk tier's folder, offline) and
``bench`` (data paths beside raw baselines). The library never imports from here.
"""

from __future__ import annotations

from lmtier.cli.main import main

__all__ = ["main"]
