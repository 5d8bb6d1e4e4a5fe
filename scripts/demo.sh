#!/usr/bin/env bash
# Run the demo (python -m mergeprobe.demo) in the repository's .venv. Extra arguments go to
# the demo, e.g. --out DIR --steps N.
set -euo pipefail

cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
HF_HUB_OFFLINE=1 python -m mergeprobe.demo "$@"
