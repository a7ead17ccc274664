"""``lmtier replay``: request traces through the tiers, hit ratios beside OPT and the ceiling.

Layout: ``traces``, ``trace_file``, ``synthetic`` and ``workloads`` read or generate a trace;
``run`` replays one (sizes only through ``cascade_sim``, or real tensors through a store) and
``optimal`` gives Belady's OPT and the ceiling; ``capacity`` turns fractions into budgets;
``sweep`` runs every policy at every capacity; ``report`` and ``policy_report`` print, write
and plot the results; ``command`` is the subcommand itself.
"""
