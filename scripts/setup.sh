#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install mergeprobe with its dev extras.
# Idempotent: safe to run again; it only installs what is missing or out of date. Quiet (-qq):
# pip's errors still show.
set -euo pipefail

cd "$(dirname "$0")/.."

TORCH_VERSION="2.13.0"

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# torch first, pinned: this machine has a CPU build of it on disk, while an unpinned torch
# would pull a multi-GB CUDA build as a dependency of the package.
installed_torch="$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$installed_torch" != "$TORCH_VERSION" ]; then
    echo "setup: installing torch==$TORCH_VERSION"
    python -m pip install -qq "torch==$TORCH_VERSION"
fi

python -m pip install -qq -e ".[dev]"
echo "setup: ready ($(python -c 'import mergeprobe, torch; print(f"mergeprobe {mergeprobe.__version__}, torch {torch.__version__}")'))"
