#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite on CPU. GPU tests skip cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q -rs "$@"
