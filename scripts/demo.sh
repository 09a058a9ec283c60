#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the embedded demo: the shipped testbed pair, CPU, ONNX Runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
hybridstitch demo --out hybridstitch-demo "$@"
