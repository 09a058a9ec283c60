"""Bad command lines (issue 15, points 6 and 7): one line ``hybridstitch: error: ...``, exit
status 2, and nothing written or lost -- outputs are checked before any model is loaded."""

import json
import os
import shutil
import time

import pytest

from hybridstitch.cli import main
from hybridstitch.testbed import LARGE_DIR, SMALL_DIR

PROMPT = ["--prompt", "a handwritten 4"]


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes and mtime: what must not change."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


def one_line_error(capsys, fragment: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("hybridstitch: error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    return err


def test_generate_refuses_folder_outputs_before_loading(tmp_path, capsys):
    (tmp_path / "keep.png").write_bytes(b"mine")
    before = snapshot(tmp_path)
    # --large does not exist: the output errors must come first, before any loading is tried.
    missing = str(tmp_path / "no-model")
    assert main(["generate", "--large", missing, "--small", missing, *PROMPT, "--out", str(tmp_path)]) == 2
    one_line_error(capsys, f"--out {tmp_path} is a folder; give a file path")
    assert main(["generate", "--large", missing, "--small", missing, *PROMPT, "--out", str(tmp_path / "x.png"),
                 "--trace", str(tmp_path)]) == 2
    one_line_error(capsys, f"--trace {tmp_path} is a folder; give a file path (e.g. {tmp_path}/trace.json)")
    assert main(["generate", "--large", missing, "--small", missing, *PROMPT, "--out",
                 str(tmp_path / "keep.png" / "x.png")]) == 2
    one_line_error(capsys, "is a file, so no folder can be made there")
    assert main(["generate", "--large", missing, "--small", missing, *PROMPT, "--out", str(tmp_path / "a.png"),
                 "--trace", str(tmp_path / "a.png")]) == 2
    one_line_error(capsys, "is also an image path")
    assert snapshot(tmp_path) == before


def test_generate_with_several_prompts_checks_every_image_path(tmp_path, capsys):
    (tmp_path / "img-1.png").mkdir()  # the second image's path is a folder
    missing = str(tmp_path / "no-model")
    assert main(["generate", "--large", missing, "--small", missing, "--prompt", "a handwritten 1", "--prompt",
                 "a handwritten 2", "--out", str(tmp_path / "img.png")]) == 2
    one_line_error(capsys, "img-1.png is a folder")


@pytest.mark.parametrize("argv, fragment", [
    (["--threads", "-1"], "argument --threads: must be at least 1, got -1"),
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--steps", "2.5"], "argument --steps: expected a whole number, got '2.5'"),
    (["--seed", str(2**70)], "argument --seed: must be in [0, 2**64 - 1]"),
    (["--seed", "-1"], "argument --seed: must be in [0, 2**64 - 1]"),
    (["--guidance-scale", "inf"], "argument --guidance-scale: must be a finite number, got 'inf'"),
    (["--guidance-scale", "nan"], "argument --guidance-scale: must be a finite number, got 'nan'"),
    (["--height", "0"], "argument --height: must be at least 1"),
    (["--encoders", "gpu"], "argument --encoders: invalid choice"),
])
def test_generate_number_errors_are_one_line(tmp_path, capsys, argv, fragment):
    out = tmp_path / "x.png"
    assert main(["generate", "--large", LARGE_DIR, "--small", SMALL_DIR, *PROMPT, "--out", str(out), *argv]) == 2
    one_line_error(capsys, fragment)
    assert not out.exists()


def test_usage_errors_are_one_line(capsys):
    assert main(["generate", "--small", SMALL_DIR, *PROMPT]) == 2
    one_line_error(capsys, "the following arguments are required: --large")
    assert main(["no-such-command"]) == 2
    one_line_error(capsys, "invalid choice: 'no-such-command'")


def test_generate_runs_with_a_valid_seed_at_the_top_of_the_range(tmp_path, capsys):
    out = tmp_path / "digit.png"
    assert main(["generate", "--large", LARGE_DIR, "--small", SMALL_DIR, *PROMPT, "--steps", "2", "--seed",
                 str(2**64 - 1), "--threads", "1", "--out", str(out), "--no-progress"]) == 0
    assert out.exists()


def test_demo_refuses_bad_numbers_and_file_outputs(tmp_path, capsys):
    assert main(["demo", "--threads", "0", "--out", str(tmp_path / "d")]) == 2
    one_line_error(capsys, "argument --threads: must be at least 1, got 0")
    target = tmp_path / "results.txt"
    target.write_text("mine")
    assert main(["demo", "--out", str(target), "--no-progress"]) == 2
    one_line_error(capsys, f"--out {target} is a file, not a folder")
    assert target.read_text() == "mine" and not (tmp_path / "d").exists()


def test_demo_never_writes_over_files_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "grid.png").write_bytes(b"my own grid")
    before = snapshot(out)
    t0 = time.perf_counter()
    assert main(["demo", "--out", str(out), "--no-progress", "--steps", "2"]) == 2
    one_line_error(capsys, "holds grid.png, which the demo would replace, and no summary.json of an earlier demo run")
    assert snapshot(out) == before and time.perf_counter() - t0 < 30  # refused before the export


def test_demo_never_replaces_engines_it_did_not_make(tmp_path, capsys, tiny_engines):
    engines_of_another_pair, _ = tiny_engines
    out = tmp_path / "demo"
    shutil.copytree(engines_of_another_pair, out / "engines")
    before = snapshot(out)
    assert main(["demo", "--out", str(out), "--no-progress", "--steps", "2"]) == 2
    err = one_line_error(capsys, "holds engines the demo did not make")
    assert "the demo never replaces them: choose another --out folder" in err
    assert snapshot(out) == before

    (out / "engines" / "manifest.json").unlink()  # files, but no manifest: not the demo's either
    before = snapshot(out)
    assert main(["demo", "--out", str(out), "--no-progress", "--steps", "2"]) == 2
    one_line_error(capsys, "holds files but no engine manifest.json")
    assert snapshot(out) == before

    shutil.rmtree(out / "engines")
    (out / "engines").write_text("not a folder")
    assert main(["demo", "--out", str(out), "--no-progress", "--steps", "2"]) == 2
    one_line_error(capsys, "is a file where the demo keeps its engines")


def test_calibrate_refuses_a_file_output_before_the_sweep(tmp_path, capsys):
    target = tmp_path / "calibration"
    target.write_text("mine")
    t0 = time.perf_counter()
    assert main(["calibrate", "--out", str(target), "--samples", "2"]) == 2
    one_line_error(capsys, f"--out {target} is a file, not a folder")
    assert target.read_text() == "mine" and time.perf_counter() - t0 < 30


@pytest.mark.parametrize("argv, fragment", [
    (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--seed", str(2**70)], "--seed must be an integer in [0, 18446744073709551615]"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    (["--ratios", "0.3,1.5"], "--ratios are mask ratios in (0, 1], got 0.3,1.5"),
    (["--thresholds-1", ","], "--thresholds-1 needs at least one value"),
    (["--max-accuracy-drop", "-0.1"], "--max-accuracy-drop must be >= 0"),
])
def test_calibrate_refuses_bad_numbers_before_the_sweep(tmp_path, capsys, argv, fragment):
    """Before: ``--threads 0`` reached torch.set_num_threads and ended in a traceback."""
    out = tmp_path / "calibration"
    t0 = time.perf_counter()
    assert main(["calibrate", "--out", str(out), *argv]) == 2
    one_line_error(capsys, fragment)
    assert not out.exists() and time.perf_counter() - t0 < 30


def test_demo_runs_without_guidance_on_its_engines(tmp_path, capsys, testbed_engines):
    """Before: the demo exported engines for the CFG batch, then refused the guidance-free batch and
    advised a --batch flag it does not have. (The testbed engines are the demo's configuration; the
    graphs take any batch.)"""
    out = tmp_path / "demo"
    shutil.copytree(testbed_engines, out / "engines")
    graphs = {p.name: p.stat().st_mtime_ns for p in (out / "engines").glob("*.onnx*")}
    assert main(["demo", "--out", str(out), "--guidance-scale", "1.0", "--steps", "2", "--no-progress"]) == 0
    assert "CFG 1.0" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "engines").glob("*.onnx*")} == graphs  # reused, not rebuilt
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "onnxruntime" and set(summary["methods"]) == {"large", "small", "hybridstitch"}


def test_api_demo_arguments_are_checked(tmp_path):
    from hybridstitch import HybridStitchError
    from hybridstitch.demo import run_demo

    for kw, fragment in ((dict(threads=0), "threads must be an integer >= 1"),
                         (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
                         (dict(seed=2**70), "seed must be an integer in [0, 18446744073709551615]"),
                         (dict(prompts=[]), "prompts is an empty list"),
                         (dict(backend="tensorrt"), "demo backend must be 'onnxruntime' or 'torch'")):
        with pytest.raises(HybridStitchError, match=None) as e:
            run_demo(out_dir=str(tmp_path / "d"), progress=False, **kw)
        assert fragment in str(e.value)
    assert not (tmp_path / "d").exists()


def test_an_earlier_demo_folder_is_reused(tmp_path):
    from hybridstitch.demo import check_out_dir

    out = tmp_path / "demo"
    out.mkdir()
    (out / "grid.png").write_bytes(b"from an earlier run")
    (out / "summary.json").write_text(json.dumps({"backend": "torch", "methods": {}, "prompts": ["a handwritten 1"]}))
    check_out_dir(str(out), 1)  # no error: the demo's own files
