"""Loading a benchmark script (``benchmarks/NAME.py``) in a test, and the testbed-weights skip."""

import importlib.util
import os
import sys

import pytest

from hybridstitch.testbed import LARGE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

needs_weights = pytest.mark.skipif(
    not os.path.isfile(os.path.join(LARGE_DIR, "transformer", "config.json")),
    reason="testbed weights not trained (python -m hybridstitch.testbed.train)",
)


def script_path(name: str) -> str:
    return os.path.join(ROOT, "benchmarks", f"{name}.py")


def load_script(name: str):
    """``benchmarks/NAME.py`` as a module (``NAME_bench``)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", script_path(name))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # importlib's recipe for a source file: dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
