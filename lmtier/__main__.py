"""``python -m lmtier``: the ``lmtier`` command."""

from __future__ import annotations

from lmtier.cli import main

raise SystemExit(main())
