"""``lmtier stress``: concurrent tasks overfill every tier, and every entry is checked.

Layout: ``run`` holds the options, the report and the run on each task's own keys; ``shared``
the run on one shared key space (overwrites, deletes, cancelled calls, checked against a
model); ``plan`` sizes a run from the tiers' budgets; ``space`` gives a run its own namespace
and removes it; ``report`` prints the verdict; ``command`` is the subcommand itself.
"""
