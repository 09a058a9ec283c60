"""``benchmarks/quality.py``: the Tables 1-3 benchmark on a tiny configuration."""

import json
import os
import subprocess
import sys

import pytest

from hybridstitch.errors import HybridStitchError
from tests.benchmarks.scripts import load_script as load_bench
from tests.benchmarks.scripts import needs_weights, script_path

SCRIPT = script_path("quality")


def load_script():
    return load_bench("quality")


def test_resolve_methods_puts_large_first_and_refuses_unknown_names():
    q = load_script()
    rows = q.resolve_methods("small,large,hybridstitch-30-static,hybridstitch-30,testbed-30-static")
    assert [r[0] for r in rows] == ["large", "small", "hybridstitch-30-static", "hybridstitch-30", "staticmask-30"]
    assert rows[2][1] == "hybridstitch-30-static" and rows[2][2] == "-"  # a bare preset
    assert rows[3][1] == "testbed-30"  # row labels before preset names
    cached = q.resolve_methods("pab,testbed-30+taylorseer,refresh-every-4")
    assert [r[1] for r in cached] == ["large", "pab", "testbed-30+taylorseer", "testbed-30-refresh4"]
    assert q.preset_of("pab") == "large" and q.preset_of("testbed-30+taylorseer") == "testbed-30"
    with pytest.raises(HybridStitchError, match="unknown method 'nope'"):
        q.resolve_methods("nope")
    assert q.is_ablation("staticmask-30", "2") and q.is_ablation("hybridstitch-30 (paper thresholds)", "1")
    assert not q.is_ablation("hybridstitch-30", "1")


@needs_weights
def test_tiny_run_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "quality"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--methods", "large,small,t-stitch,pab", "--samples-per-seed", "8", "--seeds", "0,1",
         "--steps", "3", "--batch-size", "4", "--latency-rounds", "1", "--out", str(out),
         "--note", "a tiny run"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "quality.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}  # one record per row
    assert list(rows) == ["large", "small", "t-stitch", "pab"]
    for r in rows.values():
        assert {"method", "preset", "samples", "seeds", "fd_mean", "fd_std", "dist_to_large", "speedup_measured",
                "speedup_modelled"} <= set(r)
        assert r["samples"] == 16 and r["seeds"] == [0, 1]  # every row on every seed
    assert rows["large"]["speedup_modelled"] == pytest.approx(1.0) and rows["large"]["dist_to_large"] == 0.0
    assert rows["small"]["speedup_modelled"] > 1.0 and rows["small"]["dist_to_large"] > 0.0
    assert rows["pab"]["speedup_modelled"] is None and rows["pab"]["hooks"]  # no price for cached calls
    assert [p["seed"] for p in rows["small"]["per_seed"]] == [0, 1]
    assert report["front_measured"] and "large" in report["front_measured"]
    assert set(report["real_fd_floor"]) == {"8", "16"} and report["note"] == "a tiny run"
    md = (tmp_path / "quality.md").read_text()
    assert "| 1 | small | small | 16 |" in md and "Real-vs-real FD floor" in md and "Pareto front" in md and "**Note:** a tiny run" in md
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "quality.md").unlink()
    rerun = subprocess.run([sys.executable, SCRIPT, "--render", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (tmp_path / "quality.md").read_text() == md  # the same table, from the JSON alone
