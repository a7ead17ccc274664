"""``python -m lmtier.cli``: the ``lmtier`` command."""

from __future__ import annotations

from lmtier.cli.main import main

raise SystemExit(main())
