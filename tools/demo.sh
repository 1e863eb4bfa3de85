#!/usr/bin/env bash
# The main job on its embedded default: trains cswin_tiny_224 from scratch on scikit-learn's
# handwritten digits (real images that ship inside scikit-learn) with tools/train.py, then
# evaluates the checkpoint with tools/eval.py and prints top-1 / top-5. A few minutes on 2 CPU cores.
# Creates or reuses .venv first. Extra arguments go to train.py (e.g. --epochs 2).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/tools/env.sh")
cd "$root"
run=runs/demo-digits
rm -rf "$run"  # a fresh run each time; use tools/train.py --resume to continue one
"$py" tools/train.py --model cswin_tiny_224 --dataset digits --epochs 4 --output "$run" "$@"
"$py" tools/eval.py --model cswin_tiny_224 --dataset digits --checkpoint "$run/model.safetensors"
