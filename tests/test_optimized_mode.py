"""Every entry point runs under ``python -OO``, where docstrings are None.

Argparse descriptions and report texts come from module-level constants, never from
``__doc__``; these run each entry point in a fresh ``-OO`` interpreter.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (argv after `python -OO`, a piece of the output that shows it got past argument parsing)
ENTRY_POINTS = [
    (["-m", "hybridstitch.cli", "--help"], "usage: hybridstitch"),
    (["-m", "hybridstitch.cli", "bench", "--help"], "--tensorrt-precision"),
    (["-m", "hybridstitch.cli", "calibrate", "--help"], "--thresholds-1"),
    (["-c", "import hybridstitch.bench, hybridstitch.testbed.calibrate as c; print(c.rule_text()[:40])"],
     "a configuration is acceptable"),
    (["-m", "hybridstitch.bench.latency", "--help"], "Latency benchmark"),
    (["-m", "hybridstitch.testbed.calibrate", "--help"], "hybridstitch calibrate"),
    (["-m", "hybridstitch.testbed.train", "--help"], "Train the testbed"),
    ([os.path.join("benchmarks", "latency.py"), "--help"], "--synthetic-scale"),
    ([os.path.join("benchmarks", "quality.py"), "--help"], "--samples-per-seed"),
    ([os.path.join("benchmarks", "engines.py"), "--help"], "--buckets"),
    ([os.path.join("benchmarks", "masked_forward.py"), "--help"], "--ratios"),
]


@pytest.mark.parametrize("argv,expected", ENTRY_POINTS, ids=[" ".join(a[:3]) for a, _ in ENTRY_POINTS])
def test_entry_point_runs_without_docstrings(argv, expected):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-OO", *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout
