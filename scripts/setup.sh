#!/usr/bin/env bash
# Creates .venv (if missing) and installs hybridstitch with its CPU dependencies.
# torch==2.13.0 first: the CPU build from local disk, never a multi-GB CUDA download.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import hybridstitch, torch, onnxruntime; print('hybridstitch', hybridstitch.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
