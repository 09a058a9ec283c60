"""``benchmarks/gpu_latency.py --dry-run``: the GPU script's whole path on CPU with tiny models."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_latency.py")


def run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)


def test_dry_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "gpu"
    proc = run_script("--dry-run", "--out", str(out), "--methods", "large,t-stitch,srdiffusion,hybridstitch-30,hybridstitch-30-10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["meta"]["dry_run"] and report["meta"]["device"] == "CPU (dry run)"
    assert set(report["per_call"]) == {"large", "large+kv", "small", "large_masked"}
    assert list(report["per_call"]["large_masked"]) == ["0.1", "0.2", "0.3", "0.4"]
    m = report["methods"]
    assert list(m) == ["large", "t-stitch", "srdiffusion", "hybridstitch-30", "hybridstitch-30-10"]
    assert m["large"]["speedup"] == 1.0
    assert m["hybridstitch-30"]["switch_steps"] == [2, 6] and m["hybridstitch-30"]["stage_counts"] == {"large": 2, "masked": 4, "small": 2}
    assert m["t-stitch"]["stage_counts"] == {"small": 3, "large": 5}
    for e in m.values():
        assert e["model"]["total_seconds"] > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "DRY RUN" in md and "| masked large r=0.3" in md and "| hybridstitch-30 | 2, 6 |" in md


def test_a_tight_budget_drops_methods_instead_of_overrunning(tmp_path):
    proc = run_script("--dry-run", "--out", str(tmp_path / "g"), "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["meta"]["reps"] == 1 and report["meta"]["dropped_methods"]


def test_without_a_gpu_it_says_so():
    import torch

    if torch.cuda.is_available():
        return
    proc = run_script("--steps", "2")
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
