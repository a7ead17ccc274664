"""The ``lmtier`` command and its tools, on a floor of their own above the library.

``main`` builds the parser and runs a command; each command lives beside the code it drives:
``stress`` (concurrent tasks overfill the tiers and check every entry), ``replay`` (request
traces through the tiers, beside OPT), ``inspect`` (a disk tier's folder, offline), ``bench``
(data paths beside raw baselines), ``plan`` (KV sizes of a model and what each tier holds) and
``serve`` (one store for this user's engine processes). The library never imports from here.
"""

from __future__ import annotations

from lmtier.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
