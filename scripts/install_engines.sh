#!/usr/bin/env bash
# Installs inference engines into virtual environments of their own, for lmtier's integration
# tests (tests/integrations/).  The main environment is never touched: an engine pins its own
# torch, transformers, ... which would fight lmtier's.
#
#   scripts/install_engines.sh [ENGINE ...]      (default: every engine below)
#
# Each engine is one function, install_<engine>, that creates its venv if missing and installs
# into it idempotently (a second run only checks).  Run the engine's tests with that venv's
# python, e.g.  .venvs/sglang/bin/python -m pytest tests/integrations/test_sglang_backend.py
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

# SGLang 0.5.23 for the HiCache L3 storage backend (lmtier.integrations.sglang).
# Venv: $LMTIER_ENGINES_VENV_SGLANG, default .venvs/sglang in the repository.
#
# sglang goes in with --no-deps: its requirement list wants a CUDA torch 2.14 and dozens of
# serving packages that the HiCache storage API does not use.  The torch build is the CPU one
# pinned by constraints-cpu.txt.  SGLANG_IMPORT_DEPS is what `import sglang` (run by importing
# sglang.srt.mem_cache.storage.backend_factory) needs, found by importing it in a bare venv and
# adding what failed until it imported (transformers and pillow come with lmtier[test]).
# torchvision must stay out: no CPU build of it matches the pinned torch here, and transformers
# imports it whenever it is installed.
SGLANG_VERSION=0.5.23
SGLANG_IMPORT_DEPS=(
    orjson==3.13.0 psutil==7.2.2 pybase64==1.5.1 requests==2.34.2 triton==3.8.0
    starlette==1.10.0 msgspec==0.22.0 pyzmq==27.3.0 ipython==9.18.1 aiohttp==3.14.5
    dill==0.4.1
)

install_sglang() {
    local venv="${LMTIER_ENGINES_VENV_SGLANG:-$REPO/.venvs/sglang}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "creating $venv"
        "$PY" -m venv "$venv"
    fi
    local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    local constraints=(-c "$REPO/constraints-cpu.txt")
    "${pip[@]}" "${constraints[@]}" torch
    "${pip[@]}" --no-deps "sglang==$SGLANG_VERSION"
    "${pip[@]}" "${constraints[@]}" "${SGLANG_IMPORT_DEPS[@]}"
    "${pip[@]}" "${constraints[@]}" -e "$REPO[test]"
    "$venv/bin/python" -c '
import torch
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
import lmtier.integrations.sglang
print("sglang", __import__("sglang").__version__, "torch", torch.__version__)'
    echo "sglang venv ready: $venv"
}

main() {
    local engines=("$@")
    if [ ${#engines[@]} -eq 0 ]; then
        engines=(sglang)
    fi
    for engine in "${engines[@]}"; do
        if ! declare -F "install_$engine" >/dev/null; then
            echo "unknown engine: $engine" >&2
            exit 2
        fi
        "install_$engine"
    done
}

main "$@"
