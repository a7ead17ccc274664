#!/usr/bin/env bash
# Installs LMCache 0.5.6 and the minimal set of packages its LocalCPUBackend and LocalDiskBackend
# import into a separate folder (default: ~/.cache/lmtier/peers-site, or $LMCACHE_PEER_SITE),
# for `lmtier bench --peers`.
#
# Everything goes in with --no-deps, so pip never touches the environment's torch or numpy:
# LMCache's own requirement list asks for a CUDA torch, numpy<=2.2.6, transformers, cupy, ...,
# none of which its two local backends need.  Add the folder AFTER site-packages (PYTHONPATH
# puts it BEFORE; lmtier.cli.bench.lmcache_peer appends $LMCACHE_PEER_SITE, or the default folder,
# to sys.path itself), so the installed torch and numpy win.
#
# The set was found by importing the two backend modules with only lmtier's own dependencies
# visible, adding what failed, until they imported and ran (Python 3.11; lmcache 0.5.6 ships
# cp311 wheels only).  The storage_backend package's __init__ (GDS, P2P and remote backends,
# which pull in transformers) is not run: lmtier.cli.bench.lmcache_peer imports the two modules
# directly.
set -euo pipefail
TARGET="${1:-${LMCACHE_PEER_SITE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmtier/peers-site}}"
PY="${PYTHON:-python}"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "lmcache 0.5.6 has cp311 wheels only"'
PACKAGES=(
    lmcache==0.5.6
    # lmcache/__init__ -> platform torch ops (CPU fallback kernels use numba)
    numba==0.68.1 llvmlite==0.50.0
    # observability, system detection, config loading
    "prometheus_client==0.24.1" psutil==7.2.2 py-cpuinfo==9.0.0 requests==2.34.2 urllib3==2.8.0
    idna==3.20 certifi
    # lmcache.utils, cache policies, controller messages
    cachetools==8.0.1 sortedcontainers==2.4.0 msgspec==0.22.0 pyzmq==27.3.0
    # aiohttp (imported by the controller/observability modules) and its own imports
    aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 aiohappyeyeballs==2.7.1
    aiosignal==1.4.0 frozenlist==1.8.0 attrs==26.1.0
)
mkdir -p "$TARGET"
"$PY" -m pip install --quiet --no-deps --upgrade --target "$TARGET" "${PACKAGES[@]}"
TARGET="$(cd "$TARGET" && pwd)"
echo "LMCache 0.5.6 installed in $TARGET"
echo "use it with:  LMCACHE_PEER_SITE=$TARGET lmtier bench --peers"
echo "$TARGET"
