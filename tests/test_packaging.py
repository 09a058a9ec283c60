"""The package builds quietly and ships the testbed weights (issue 15, point 12): the weights
folders are package data, not undeclared packages, so setuptools has nothing to warn about."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "hybridstitch", "engine", "export", "plugins")


@pytest.mark.slow
def test_the_wheel_builds_without_warnings_and_ships_the_weights(tmp_path):
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "absent from the `packages` configuration" not in output and "Warning" not in output, output
    (wheel,) = (tmp_path / "dist").glob("hybridstitch-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    weights = os.path.join(REPO, "hybridstitch", "testbed", "weights")
    expected = {os.path.relpath(os.path.join(root, f), REPO).replace(os.sep, "/")
                for root, _, files in os.walk(weights) for f in files}
    assert expected and expected <= shipped, sorted(expected - shipped)
    assert {"hybridstitch/engine/base.py", "hybridstitch/export/driver.py", "hybridstitch/plugins/cached_kv.py"} <= shipped
