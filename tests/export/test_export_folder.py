"""The engine folder an export writes (issue 15, points 1, 2, 3, 10, 11, 12): it removes only its
own temporaries, holds the folder's lock, bounds and checks the opset, checks that it can write
before any work, replaces a folder (--overwrite) by swapping a complete new one in, and stays
quiet under --quiet. Each refusal leaves the folder as it was."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch

from hybridstitch import HybridStitchError
from hybridstitch.engine import integrity
from hybridstitch.engine.onnxruntime_backend import load_engines
from hybridstitch.export import ExportRequest, driver, export_engines, read_manifest
from hybridstitch.export.cli import main as cli_main
from hybridstitch.export.folder import LOCK_NAME, FolderLock, staging_folder, swap_in
from hybridstitch.export.graphs import GRAPH_MODULES, GraphShapes, dynamic_shapes, example_inputs, io_shapes
from hybridstitch.export.onnx_steps import DenoiserFromCheckpoint, OnnxFromGraph, exporter_messages
from tests.export.test_export import snapshot


@pytest.fixture
def work(tiny_engines, tmp_path):
    folder = str(tmp_path / "eng")
    shutil.copytree(tiny_engines[0], folder)
    return folder


def _cli_args(tiny_dirs, out, *more):
    return ["--large", tiny_dirs[0], "--small", tiny_dirs[1], "--height", "64", "--width", "64", "--batch", "2",
            "--buckets", "0.1", "0.3", "--text-tokens", "7", "--out", out, *more]


def _one_line_error(capsys, match):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err


# -- 1. temporaries ----------------------------------------------------------------------------------------


def test_only_the_exports_own_temporaries_are_removed(tiny_engines, work, tmp_path):
    """Before: every .tmp-* entry of the folder went, a user's and a running export's alike."""
    _, req = tiny_engines
    mine = [os.path.join(work, ".tmp-notes"), os.path.join(work, ".tmp-draft.txt"),
            str(tmp_path / ".tmp-hybridstitch-export-eng2.new.abcd1234")]  # another folder's staging
    os.makedirs(mine[0])
    open(os.path.join(mine[0], "keep.txt"), "w").close()
    open(mine[1], "w").close()
    os.makedirs(mine[2])
    stale = [os.path.join(work, ".tmp-hybridstitch-export-small-x1y2z3"),  # a killed export's graph folder
             os.path.join(work, ".tmp-hybridstitch-export-abc123manifest.json"),  # its half-written manifest
             str(tmp_path / ".tmp-hybridstitch-export-eng.new.abcd1234")]  # its --overwrite staging folder
    os.makedirs(stale[0])
    open(stale[1], "w").close()
    os.makedirs(stale[2])
    export_engines(req, work, progress=False)  # up to date: builds nothing
    assert all(os.path.exists(p) for p in mine) and os.path.isfile(os.path.join(mine[0], "keep.txt"))
    assert not any(os.path.exists(p) for p in stale)


# -- 2. the lock ---------------------------------------------------------------------------------------------


def test_a_second_export_is_refused_while_the_first_writes(tiny_engines, work, monkeypatch):
    """Before: both ran, and the manifest could disagree with the files."""
    _, req = tiny_engines
    with open(os.path.join(work, "small.onnx"), "r+b") as f:
        f.truncate(100)  # damaged: the first export rebuilds it
    before = snapshot(work)
    seen = []

    def second_export_meanwhile(*a, **k):
        with pytest.raises(HybridStitchError) as e:
            export_engines(ExportRequest(**{**vars(req), "buckets": (0.2,)}), work, progress=False)
        seen.append(str(e.value))
        raise KeyboardInterrupt  # stop the first one here

    monkeypatch.setattr(driver, "_build_graph", second_export_meanwhile)
    with pytest.raises(KeyboardInterrupt):
        export_engines(req, work, progress=False)
    assert seen and "another hybridstitch-export is writing into" in seen[0] and "--wait SECONDS" in seen[0]
    assert snapshot(work) == before


def _hold_lock(folder, seconds):
    code = textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({os.path.join(folder, LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_another_process_holding_the_folder_is_waited_for_or_refused(tiny_engines, tiny_dirs, work, capsys):
    _, req = tiny_engines
    proc = _hold_lock(work, 3)
    try:
        assert cli_main(_cli_args(tiny_dirs, work, "--quiet")) == 2
        _one_line_error(capsys, "another hybridstitch-export is writing into")
        start = time.monotonic()
        export_engines(req, work, progress=False, wait=60)  # waits for the holder, then finds all up to date
        assert time.monotonic() - start > 0.5
    finally:
        proc.kill()
        proc.wait()


def test_a_waiter_locks_the_folder_that_replaced_the_one_it_waited_on(tmp_path):
    """--overwrite swaps the folder, lock file included: a waiter must not keep the old file's lock."""
    folder = str(tmp_path / "eng")
    got = []
    with FolderLock(folder):
        waiter = threading.Thread(target=lambda: got.append(FolderLock(folder, wait=30).__enter__()))
        waiter.start()
        time.sleep(0.5)
        staging = staging_folder(folder)
        swap_in(staging, folder)
        assert not os.path.exists(staging)
    waiter.join(30)
    (lock,) = got
    assert os.path.samestat(os.fstat(lock._fd), os.stat(os.path.join(folder, LOCK_NAME)))
    with pytest.raises(HybridStitchError, match="another hybridstitch-export"):
        FolderLock(folder).__enter__()
    lock.__exit__(None, None, None)


# -- 3. the opset --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [24, 26, 99])
def test_an_opset_beyond_the_exporter_is_refused_before_any_work(tiny_dirs, tmp_path, capsys, opset):
    """Before: exit 0 after tracebacks, and a manifest recording an opset the graphs did not have."""
    out = str(tmp_path / "eng")
    assert cli_main(_cli_args(tiny_dirs, out, "--opset", str(opset))) == 2
    _one_line_error(capsys, f"opset {opset} is beyond what this export can write")
    assert not os.path.exists(out)
    with pytest.raises(HybridStitchError, match="Choose --opset 18..2"):
        ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], height=64, width=64, opset=opset)


def test_the_written_opset_is_checked(tiny_dirs):
    """Asked for an opset its converter fails on (the request refuses 26; the step is called directly),
    torch.onnx logs the failure and keeps its own opset: refused before any file is written."""
    denoiser = DenoiserFromCheckpoint(tiny_dirs[1], "small", torch.float32)()
    shapes = GraphShapes(2, 8, 8, 7)
    ins, outs = io_shapes("small", denoiser.spec, shapes)
    example = example_inputs("small", denoiser.spec, shapes, torch.float32, None, batch=2)
    step = OnnxFromGraph(GRAPH_MODULES["small"](denoiser), [i[0] for i in ins], [o[0] for o in outs], example, 26,
                         dynamic_shapes("small", denoiser.spec, shapes))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with exporter_messages(quiet=False), pytest.raises(HybridStitchError, match="wrote opset 18, not the opset 26"):
            step()
    noise = [str(w.message) for w in seen if "axis name" in str(w.message) or "LeafSpec" in str(w.message)]
    assert noise == []  # torch.onnx's known noise is dropped even without --quiet


# -- 10. permissions -----------------------------------------------------------------------------------------


def test_a_read_only_folder_is_refused_before_any_work(tiny_dirs, work, monkeypatch, capsys):
    """Before: found only after the whole export, as a raw PermissionError."""
    real_access = os.access
    os.chmod(work, 0o555)
    # root may write anywhere: make os.access answer as for a user
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if (os.path.abspath(p) == work and mode & os.W_OK)
                        else real_access(p, mode, **k))
    monkeypatch.setattr(driver, "plan_export", lambda req: pytest.fail("export work began"))
    try:
        assert cli_main(_cli_args(tiny_dirs, work, "--text-tokens", "9", "--overwrite")) == 2
        _one_line_error(capsys, "cannot write in it (permission denied)")
    finally:
        os.chmod(work, 0o755)


def test_a_file_as_the_output_folder_is_refused_before_any_work(tiny_dirs, tmp_path, monkeypatch, capsys):
    """Before: a traceback after the export work."""
    target = tmp_path / "engines"
    target.write_text("mine")
    monkeypatch.setattr(driver, "plan_export", lambda req: pytest.fail("export work began"))
    assert cli_main(_cli_args(tiny_dirs, str(target))) == 2
    _one_line_error(capsys, f"--out {target} is a file, not a folder")
    assert cli_main(_cli_args(tiny_dirs, str(target / "sub"))) == 2
    _one_line_error(capsys, "is a file, so no folder can be made there")
    assert cli_main(_cli_args(tiny_dirs, str(tmp_path / "eng"), "--wait", "-1")) == 2
    _one_line_error(capsys, "argument --wait: must be a finite number of seconds >= 0")
    assert target.read_text() == "mine" and os.listdir(tmp_path) == ["engines"]


def test_unreadable_checkpoint_weights_are_a_clear_error(tiny_dirs, tmp_path, monkeypatch):
    weights = os.path.join(tiny_dirs[1], "transformer", "diffusion_pytorch_model.safetensors")
    real_open = open

    def guarded(p, *a, **k):  # as open() of a file without read permission (root reads anything)
        if os.path.abspath(p) == weights:
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, *a, **k)

    monkeypatch.setattr(integrity, "open", guarded, raising=False)
    with pytest.raises(HybridStitchError, match="cannot read .*diffusion_pytorch_model.safetensors .Permission denied"):
        export_engines(ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], height=64, width=64, text_tokens=7),
                       str(tmp_path / "eng"), progress=False)


# -- 11. --overwrite ---------------------------------------------------------------------------------------


def test_a_failed_overwrite_leaves_the_earlier_engines_loadable(tiny_engines, work, tmp_path, monkeypatch):
    """Before: the old engines were rebuilt in place, and an interruption left them unloadable."""
    _, req = tiny_engines
    other = ExportRequest(**{**vars(req), "text_tokens": 9, "overwrite": True})
    before = snapshot(work)
    calls = []
    real = driver._build_graph

    def fail_on_the_second_graph(g, plan, load, out, bar):
        calls.append(out)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted midway: the small graph is built, the large is not
        return real(g, plan, load, out, bar)

    monkeypatch.setattr(driver, "_build_graph", fail_on_the_second_graph)
    with pytest.raises(KeyboardInterrupt):
        export_engines(other, work, progress=False)
    assert os.path.dirname(calls[0]) == str(tmp_path) and calls[0] != work  # built beside the folder
    assert snapshot(work) == before and sorted(os.listdir(tmp_path)) == ["eng"]  # nothing left beside it
    load_engines(work, num_threads=1)  # the earlier engines, intact and loadable
    monkeypatch.undo()

    os.chmod(work, 0o751)
    manifest = export_engines(other, work, progress=False)
    assert manifest.tokens["text"] == 9 and read_manifest(work).tokens["text"] == 9
    assert sorted(os.listdir(tmp_path)) == ["eng"]
    assert os.stat(work).st_mode & 0o7777 == 0o751  # the new folder keeps the old one's permissions
    load_engines(work, num_threads=1)


def test_overwrite_never_replaces_files_no_export_wrote(tiny_engines, work, monkeypatch):
    _, req = tiny_engines
    open(os.path.join(work, "notes.txt"), "w").close()
    before = snapshot(work)
    monkeypatch.setattr(driver, "_build_graph", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(HybridStitchError, match="--overwrite replaces .* as a whole, and it holds notes.txt"):
        export_engines(ExportRequest(**{**vars(req), "text_tokens": 9, "overwrite": True}), work, progress=False)
    assert snapshot(work) == before


def test_a_folder_of_other_files_is_never_built_into(tiny_dirs, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "small.onnx").write_text("my own model")
    (folder / "readme.txt").write_text("mine")
    with pytest.raises(HybridStitchError, match="holds readme.txt, small.onnx but no engine manifest.json"):
        export_engines(ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], height=64, width=64, text_tokens=7),
                       str(folder), progress=False)
    assert sorted(os.listdir(folder)) == ["readme.txt", "small.onnx"]  # not even a lock file
    (folder / "readme.txt").unlink()  # a graph no manifest claims is not the export's either
    with pytest.raises(HybridStitchError, match="holds small.onnx but no engine manifest.json"):
        export_engines(ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], height=64, width=64, text_tokens=7),
                       str(folder), progress=False)
    assert sorted(os.listdir(folder)) == ["small.onnx"] and (folder / "small.onnx").read_text() == "my own model"


def test_a_first_export_writes_its_manifest_before_any_graph(tiny_dirs, tmp_path, monkeypatch):
    """So a folder never holds graphs no manifest claims; one stopped before its first graph holds
    nothing to keep, and an export of another configuration goes in without --overwrite."""
    out = str(tmp_path / "eng")
    req = ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], height=64, width=64, text_tokens=7)

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "_build_graph", stopped)
    with pytest.raises(KeyboardInterrupt):
        export_engines(req, out, progress=False)
    m = read_manifest(out)
    assert not m.complete and m.graphs == {}
    monkeypatch.undo()
    manifest = export_engines(ExportRequest(**{**vars(req), "text_tokens": 9}), out, progress=False)
    assert manifest.complete and read_manifest(out).tokens["text"] == 9


# -- 12. --quiet ---------------------------------------------------------------------------------------------


def test_quiet_export_prints_nothing_but_its_summary(tiny_dirs, tmp_path):
    """Before: ~18 lines of torch.onnx / onnxscript warnings per export."""
    out = str(tmp_path / "eng")
    proc = subprocess.run([sys.executable, "-m", "hybridstitch.export.cli", *_cli_args(tiny_dirs, out, "--quiet")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout)["engines"] == ["large", "small"]
