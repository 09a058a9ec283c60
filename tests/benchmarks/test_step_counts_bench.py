"""``benchmarks/step_counts.py``: switch steps across step counts, on a tiny configuration."""

import json
import os
import subprocess
import sys

import pytest

from hybridstitch.trace import Trace
from tests.benchmarks.scripts import load_script as load_bench
from tests.benchmarks.scripts import needs_weights, script_path

SCRIPT = script_path("step_counts")


def load_script():
    return load_bench("step_counts")


def test_switch_stats_counts_a_run_that_never_switched_as_switching_at_the_end():
    s = load_script()

    def trace(switches):
        return Trace(config={}, num_steps=10, height=8, width=8, batch=1, backend="eager", switch_steps=switches)

    sigmas = [1.0 - i / 10 for i in range(11)]  # sigma at step i; sigmas[10] = 0
    out = s.switch_stats([trace([2, 6]), trace([4])], sigmas, 10)
    assert out["switch_steps"] == pytest.approx([3.0, 8.0])  # the second image never left stage 2: step 10
    assert out["switch_fraction"] == pytest.approx([0.3, 0.8])
    assert out["switch_sigma"] == pytest.approx([0.7, 0.2])  # mean of sigma(6), sigma(10) = (0.4 + 0) / 2
    assert s.switch_stats([], sigmas, 10) == dict(switch_steps=[], switch_fraction=[], switch_sigma=[])


@needs_weights
def test_tiny_run_writes_one_row_per_step_count_and_method(tmp_path):
    out = tmp_path / "steps"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--steps", "4,8", "--methods", "t-stitch,testbed-30-sigma", "--samples", "4",
         "--long-steps", "0", "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "steps.json").read_text())
    assert [(r["steps"], r["method"]) for r in report["rows"]] == [
        (4, "t-stitch"), (4, "testbed-30-sigma"), (8, "t-stitch"), (8, "testbed-30-sigma")]
    tstitch = [r for r in report["rows"] if r["method"] == "t-stitch"]
    assert [r["switch_steps"] for r in tstitch] == [[2.0], [3.0]]  # floor(0.4 T + 0.5)
    assert all(0 < r["dist_to_large"] and r["speedup_modelled"] > 1.0 for r in report["rows"])
    assert "| 8 | testbed-30-sigma | 4 |" in (tmp_path / "steps.md").read_text()
