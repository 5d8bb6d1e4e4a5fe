#!/usr/bin/env bash
# Run the test suite in the repository's .venv (set up first). Extra arguments go to pytest.
set -euo pipefail

cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
HF_HUB_OFFLINE=1 python -m pytest -q tests "$@"
