"""The embedded demo end to end on the shipped testbed, ONNX Runtime backend."""

import json
import os

from hybridstitch.demo import run_demo


def test_demo_writes_every_file_it_promises(tmp_path, capsys):
    out = tmp_path / "demo"
    prompts = ("a handwritten 1", "a handwritten 7")
    summary = run_demo(out_dir=str(out), prompts=prompts, steps=6, progress=False)
    files = set(os.listdir(out))
    expected = {"grid.png", "masks.png", "summary.json", "engines"}
    for method in ("large", "small", "hybridstitch"):
        expected |= {f"trace-{method}.json", f"{method}-0.png", f"{method}-1.png"}
    assert expected <= files, expected - files
    assert set(summary["methods"]) == {"large", "small", "hybridstitch"}
    assert summary["backend"] == "onnxruntime"
    traces = json.loads((out / "trace-hybridstitch.json").read_text())  # one per image
    assert [t["sample"] for t in traces] == [0, 1]
    assert all(t["backend"] == "onnxruntime" and len(t["steps"]) == 6 for t in traces)
    assert any(s["mask_index"] for t in traces for s in t["steps"])  # the masks picture has something to show
    assert "speed-up" in capsys.readouterr().out

    # A second run reuses the exported engines instead of exporting again -- also without guidance
    # (the engines were exported for the CFG batch; the graphs take any batch).
    manifest = out / "engines" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    summary = run_demo(out_dir=str(out), prompts=prompts, steps=3, guidance_scale=1.0, progress=False)
    assert manifest.stat().st_mtime_ns == before
    assert summary["methods"]["hybridstitch"]["stage_counts"]
