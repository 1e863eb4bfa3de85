#!/usr/bin/env bash
# Creates, or reuses, the project's environment in .venv and prints its python's path.
#
#   bash tools/env.sh          core + dev tools (timm, torch, pytest, natten)
#   bash tools/env.sh --mm     also the OpenMMLab stack (mmengine, mmcv with ops, mmdet, mmseg)
#
# mmcv 2.1.0 has no wheel for torch 2.13: it is built once from its sdist (about 30 minutes
# on 2 cores) into a wheel cache outside the clone ($ATTNZOO_CACHE, default
# ~/.cache/attnzoo) and every later run installs that wheel.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${ATTNZOO_VENV:-$root/.venv}"
cache="${ATTNZOO_CACHE:-$HOME/.cache/attnzoo}"
with_mm=0
[[ "${1:-}" == "--mm" ]] && with_mm=1

log() { echo "[env] $*" >&2; }

# An empty find-links folder hides the machine's local '+cpu' torch wheel from pip.
mkdir -p "$cache/empty-find-links" "$cache/wheels"
export PIP_FIND_LINKS="$cache/empty-find-links"
export PIP_CONSTRAINT="$root/tools/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install -q)

# The stamp records what the environment was built from; a change to any of these files
# (or asking for --mm the first time) reinstalls, anything else returns at once.
stamp_of() { cat "$root/setup.py" "$root/tools/constraints.txt" "$root/tools/env.sh" | sha256sum | cut -c1-16; }
stamp="$(stamp_of)-mm$with_mm"
if [[ -f "$venv/.attnzoo-stamp" ]] && grep -qx -- "$stamp\|$(stamp_of)-mm1" "$venv/.attnzoo-stamp"; then
    echo "$py"
    exit 0
fi

log "installing torch, timm and the dev tools (first run downloads several GB of CUDA wheels)"
"${pip[@]}" "setuptools>=77,<81" wheel ninja psutil
"${pip[@]}" torch torchvision

# natten's sdist builds as pure Python on a machine without CUDA; it needs torch at build time.
"${pip[@]}" --no-build-isolation "natten==0.21.7"
"${pip[@]}" -e "$root[dev,natten]"

if (( with_mm )); then
    # mmcv's wheel is only valid for the torch and python it was compiled against.
    torch_tag=$("$py" -c 'import sys, torch; print(f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')
    mmcv_cache="$cache/wheels/$torch_tag"
    mkdir -p "$mmcv_cache"
    if ! ls "$mmcv_cache"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
        log "building mmcv 2.1.0 with its C++ ops from the sdist into $mmcv_cache"
        log "this happens once per machine and takes about 30 minutes on 2 cores"
        "${pip[@]}" "mmengine==0.10.7"
        start=$(date +%s)
        MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$(nproc) \
            "$py" -m pip wheel --no-build-isolation --no-deps -w "$mmcv_cache" "mmcv==2.1.0"
        log "mmcv built in $(( $(date +%s) - start )) s"
    else
        log "reusing the cached mmcv wheel in $mmcv_cache"
    fi
    "${pip[@]}" --find-links "$mmcv_cache" "mmcv==2.1.0"
    "${pip[@]}" -e "$root[dev,natten,mm]"
fi

echo "$stamp" > "$venv/.attnzoo-stamp"
log "environment ready: $venv"
echo "$py"
