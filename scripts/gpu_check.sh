#!/usr/bin/env bash
# The checks that need a GPU, for a machine with CUDA and no network (under 10 minutes):
# the tests marked `cuda` (among them tests/test_server_cuda.py: blocks from the device through
# pinned shared memory into `lmtier serve` and back), then only the GPU rows of `lmtier bench`
# (the GPU tier, and the batched GPU <-> pinned CPU path at 2 and 32 MiB, single chunks and
# batches of 64).
#
#   scripts/gpu_check.sh            # from the repository root, lmtier installed or not
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, not another install

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
python -c "import lmtier, torch; print('lmtier from', lmtier.__file__, '| torch', torch.__version__, '|', torch.cuda.get_device_name())"

echo "== tests marked cuda"
timeout 300 python -m pytest -m cuda -q -p no:cacheprovider

echo "== GPU bench rows"
timeout 240 python -m lmtier.cli bench --gpu-only --no-progress
