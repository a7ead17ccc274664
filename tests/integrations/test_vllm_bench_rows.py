"""The vLLM tier's job rows (``python -m lmtier.cli.bench.vllm``) on a tiny job: every row
measured, in process and through ``lmtier serve``, and ``--pin-server`` giving the server a
core of its own while leaving this process's CPUs as they were.  Timings are never asserted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from vllm_helpers import need_engine

need_engine("vllm.v1.kv_offload.tiering.spec")

from lmtier.cli.bench.vllm import vllm_tier_rows  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("pin", [False, True], ids=["shared-cores", "pinned"])
def test_the_job_rows_are_measured_in_process_and_through_the_server(
    tmp_path: Path, pin: bool
) -> None:
    cpus = os.sched_getaffinity(0)
    rows = vllm_tier_rows(tmp_path, blocks=4, row_bytes=64 * 1024, repeats=1, pin_server=pin)
    assert os.sched_getaffinity(0) == cpus
    names = [row.name for row in rows]
    served = [name for name in names if "lmtier serve" in name]
    assert len(served) == 4 and len(names) == 9, names
    assert all(row.lmtier is not None and row.lmtier.median > 0 for row in rows), rows
    own_core = pin and len(cpus) >= 2
    assert all(("own core" in name) == own_core for name in served), served
    assert not list(tmp_path.iterdir())  # the bench's folders are gone
