"""``python -m lmtier``: the ``lmtier`` command."""

from lmtier.cli import main

raise SystemExit(main())
