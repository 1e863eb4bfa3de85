#!/usr/bin/env bash
# Creates, or reuses, the project's environment in .venv and prints its python's path.
#
#   bash tools/env.sh          core + dev tools (timm, torch, pytest, natten, onnx / onnxruntime for export)
#   bash tools/env.sh --mm     also the OpenMMLab stack (mmengine, mmcv with ops, mmdet, mmseg)
#
# Callers take the path from stdout (`py=$(bash tools/env.sh)`), so the path is the only thing
# this script writes there: the output of every step (pip, the mmcv compiler, python) goes to
# stderr, with the time each step took. A failed step names itself and how to retry.
#
# mmcv 2.1.0 has no wheel for torch 2.13: it is built once from its sdist (about 30 minutes
# on 2 cores) into a wheel cache outside the clone ($ATTNZOO_CACHE, default
# ~/.cache/attnzoo) and every later run installs that wheel. $ATTNZOO_VENV (default .venv in the
# clone) chooses where the environment lives.
set -euo pipefail

# fd 3 keeps the caller's stdout for the path alone; from here on stdout is stderr, whatever prints.
exec 3>&1 1>&2

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${ATTNZOO_VENV:-$root/.venv}"
cache="${ATTNZOO_CACHE:-$HOME/.cache/attnzoo}"
case "${1:-}" in
    '') with_mm=0 ;;
    --mm) with_mm=1 ;;
    *) echo "usage: bash tools/env.sh [--mm]   (got '$*')"; exit 2 ;;
esac
this_command="bash $root/tools/env.sh $*"
started=$SECONDS

log() { echo "[env] $*"; }

# step DESCRIPTION COMMAND...: runs one install step and says how long it took; a failure says
# which step failed, the command, and how to retry, then stops.
step() {
    local description=$1 start=$SECONDS status=0
    shift
    log "$description ..."
    "$@" || status=$?
    if (( status )); then
        log "FAILED after $(( SECONDS - start )) s: $description (exit status $status)"
        log "  command: $(printf '%q ' "$@")"
        log "  fix the error printed above, then retry with: $this_command"
        log "  (the steps already done are quick to repeat; rm -rf $venv starts the environment over)"
        exit "$status"
    fi
    log "$description: done in $(( SECONDS - start )) s"
}

# An empty find-links folder hides the machine's local '+cpu' torch wheel from pip.
mkdir -p "$cache/empty-find-links" "$cache/wheels"
export PIP_FIND_LINKS="$cache/empty-find-links"
export PIP_CONSTRAINT="$root/tools/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1

py="$venv/bin/python"
if [[ ! -x "$py" ]]; then
    step "creating the virtual environment $venv" python3 -m venv "$venv"
fi
pip=("$py" -m pip install -q)

# The stamp records what the environment was built from; a change to any of these files
# (or asking for --mm the first time) reinstalls, anything else returns at once.
stamp_of() { cat "$root/setup.py" "$root/tools/constraints.txt" "$root/tools/env.sh" | sha256sum | cut -c1-16; }
stamp="$(stamp_of)-mm$with_mm"
if [[ -f "$venv/.attnzoo-stamp" ]] && grep -qx -- "$stamp\|$(stamp_of)-mm1" "$venv/.attnzoo-stamp"; then
    echo "$py" >&3
    exit 0
fi

log "installing into $venv (the first run downloads several GB of CUDA wheels)"
step "installing the build tools" "${pip[@]}" "setuptools>=77,<81" wheel ninja psutil
step "installing torch and torchvision" "${pip[@]}" torch torchvision
# natten's sdist builds as pure Python on a machine without CUDA; it needs torch at build time.
step "installing natten" "${pip[@]}" --no-build-isolation "natten==0.21.7"
step "installing attnzoo with its dev and export tools" "${pip[@]}" -e "$root[dev,natten,export]"

if (( with_mm )); then
    # mmcv's wheel is only valid for the torch and python it was compiled against.
    if ! torch_tag=$("$py" -c 'import sys, torch; print(f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")'); then
        log "FAILED: $py cannot import torch to name the mmcv wheel; retry with: $this_command"
        exit 1
    fi
    mmcv_cache="$cache/wheels/$torch_tag"
    mkdir -p "$mmcv_cache"
    if ! ls "$mmcv_cache"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
        log "mmcv 2.1.0 is built with its C++ ops from the sdist into $mmcv_cache, once per machine"
        log "(about 30 minutes on 2 cores)"
        step "installing mmengine" "${pip[@]}" "mmengine==0.10.7"
        step "building the mmcv 2.1.0 wheel" env MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="$(nproc)" \
            "$py" -m pip wheel --no-build-isolation --no-deps -w "$mmcv_cache" "mmcv==2.1.0"
    else
        log "reusing the cached mmcv wheel in $mmcv_cache"
    fi
    step "installing mmcv from the wheel cache" "${pip[@]}" --find-links "$mmcv_cache" "mmcv==2.1.0"
    step "installing attnzoo with the OpenMMLab stack" "${pip[@]}" -e "$root[dev,natten,export,mm]"
fi

if [[ ! -x "$py" ]]; then
    log "FAILED: the steps finished but $py is not an executable; rm -rf $venv and retry with: $this_command"
    exit 1
fi
echo "$stamp" > "$venv/.attnzoo-stamp"
log "environment ready in $(( SECONDS - started )) s: $venv"
echo "$py" >&3
