"""Replay every registered eviction policy on every workload; write docs/policies.{md,csv,png}.

Thin: the work is lmtier.cli.replay.policy_report (see its --help).
"""

import sys

from lmtier.cli.replay.policy_report import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
