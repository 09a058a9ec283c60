"""The ``hybridstitch`` command line."""

import json

from PIL import Image

from hybridstitch.cli import main
from hybridstitch.testbed import LARGE_DIR, SMALL_DIR


def test_generate_writes_image_and_trace(tmp_path, capsys):
    large, small = LARGE_DIR, SMALL_DIR
    img, trace = tmp_path / "digit.png", tmp_path / "trace.json"
    rc = main(["generate", "--large", large, "--small", small, "--method", "hybridstitch-30", "--prompt", "a handwritten 4",
               "--steps", "5", "--guidance-scale", "1.25", "--seed", "1", "--out", str(img), "--trace", str(trace),
               "--no-progress"])
    assert rc == 0
    assert Image.open(img).size == (32, 32)
    data = json.loads(trace.read_text())
    assert data["num_steps"] == 5 and data["config"]["name"] == "hybridstitch-30"
    assert "switch steps" in capsys.readouterr().out


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    large, small = LARGE_DIR, SMALL_DIR
    rc = main(["generate", "--large", large, "--small", small, "--method", "fastest", "--prompt", "a handwritten 4",
               "--out", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridstitch: error: unknown preset 'fastest'")
    rc = main(["generate", "--large", str(tmp_path / "missing"), "--small", small, "--prompt", "a handwritten 4"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["generate", "--large", large, "--small", small, "--prompt", "a cat", "--steps", "2",
               "--out", str(tmp_path / "y.png")])
    assert rc == 2 and "a handwritten" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_list_presets(capsys):
    assert main(["--list-presets"]) == 0
    names = capsys.readouterr().out.split()
    assert "hybridstitch-30" in names and "srdiffusion" in names
