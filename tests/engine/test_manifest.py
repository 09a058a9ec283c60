"""Reading an engine folder's manifest (issue 15, points 4, 8, 10): a schema names the field to fix,
every path stays inside the folder, the files hashed are exactly the files loaded, a checksum
catches any edit (a changed scheduler ``shift`` would silently change the images), and an
unreadable file is a HybridStitchError. Each refusal leaves the folder as it was."""

import json
import math
import os
import shutil

import pytest

from hybridstitch import HybridStitchError
from hybridstitch.engine import integrity
from hybridstitch.engine.integrity import STAMP_NAME
from hybridstitch.engine.manifest import FORMAT_VERSION, read_manifest, sealed
from hybridstitch.engine.onnxruntime_backend import load_engines
from tests.engine.test_onnxruntime_backend import _edit_manifest as edit  # reseal=True: as a writer would
from tests.engine.test_onnxruntime_backend import snapshot


@pytest.fixture
def work(tiny_engines, tmp_path):
    folder = str(tmp_path / "eng")
    shutil.copytree(tiny_engines[0], folder)
    return folder


def _set(path, value):
    """An edit setting the field at ``path`` ("a.b[0].c") to ``value`` (``...``: delete it)."""
    def fn(raw):
        keys = path.replace("[", ".").replace("]", "").split(".")
        node = raw
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        last = int(keys[-1]) if isinstance(node, list) else keys[-1]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return fn


# Field edits a writer could make by mistake (the checksum updated, so the schema must catch them),
# each with the field path the error names. Before the schema: KeyError, AttributeError, ValueError,
# IndexError deep in a loader, or a graph from outside the folder that loaded and ran.
BAD_FIELDS = [
    ("resolution.vae_scale_factor", ..., "resolution.vae_scale_factor: Field required"),
    ("resolution.latent_height", "8", "resolution.latent_height: Input should be a valid integer"),
    ("opset", "18", "opset: Input should be a valid integer"),
    ("opset", 17, "opset: Input should be greater than or equal to 18"),
    ("batch", True, "batch: Input should be a valid integer"),
    ("tokens", [16, 7], "tokens: Input should be a valid dictionary"),
    ("tokens.image", 17, "tokens.image: 17, but a 8x8 latent in 2x2 patches has 16"),
    ("buckets[0].ratio", math.nan, r"buckets\[0\].ratio: Input should be a finite number"),
    ("buckets[0].masked_tokens", 9, r"buckets\[0\].masked_tokens: 9, but ratio 0.1 of 16 tokens is 2"),
    ("buckets", [{"ratio": 0.3}], r"buckets\[0\].masked_tokens: Field required"),
    ("precision", "int8", "precision: Input should be 'fp32', 'fp16' or 'bf16'"),
    ("graphs.large.file", "/tmp/other/large.onnx", "graphs.large.file: Value error, must be a plain file name"),
    ("graphs.large.file", "../other/large.onnx", "graphs.large.file: Value error, must be a plain file name"),
    ("graphs.large.files", [], "graphs.large.files: List should have at least 1 item"),
    ("graphs.large.files[1].name", "small.onnx.data",
     r"graphs.large.files: \['large.onnx', 'small.onnx.data'\] must be exactly the files loaded"),
    ("graphs.small.files[0].sha256", "abc", r"graphs.small.files\[0\].sha256: String should match pattern"),
    ("graphs.small", ..., "graphs.small: missing from a complete manifest"),
    ("graphs.small.inputs[0].dtype", "bfloat16", r"graphs.small.inputs\[0\].dtype: 'bfloat16' does not fit fp32"),
    ("graphs.small.inputs[0].shape[0]", "rows", r"graphs.small.inputs\[0\].shape\[0\]"),
    ("models.large.config.patch_size", 0, "models.large.config.patch_size: Input should be greater than or equal to 1"),
    ("models.small.weights.files", "all", "models.small.weights.files: Input should be a valid list"),
    ("scheduler.shift", -3.0, "scheduler.shift: Input should be greater than 0"),
    ("scheduler.shift", "3", "scheduler.shift: Input should be a valid number"),
    ("fp32_blocks", [7], "fp32_blocks: .7. names blocks beyond the large model's 3"),
    ("tensorrt", {"builds": {"x": {"dir": "../up"}}}, r"tensorrt.builds.x.dir: Value error, must be a relative path"),
    ("extra_field", 1, "extra_field: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("path,value,match", BAD_FIELDS, ids=[f"{p}={v!r}"[:40] for p, v, _ in BAD_FIELDS])
def test_a_bad_field_is_named_with_the_fix(work, path, value, match):
    edit(work, _set(path, value))
    before = snapshot(work)
    with pytest.raises(HybridStitchError, match=match) as e:
        load_engines(work, num_threads=1)
    assert "Re-export the engines" in str(e.value)
    assert type(e.value) is HybridStitchError and snapshot(work) == before


def test_an_edit_after_export_is_caught_by_the_checksum(work):
    """A changed shift is a valid number: only the checksum tells (before: the images silently changed)."""
    edit(work, lambda m: m["scheduler"].update(shift=1.0), reseal=False)
    before = snapshot(work)
    with pytest.raises(HybridStitchError, match="changed after export: its checksum does not match"):
        load_engines(work, num_threads=1)
    assert snapshot(work) == before
    edit(work, lambda m: m.pop("checksum"), reseal=False)
    with pytest.raises(HybridStitchError, match="checksum: Field required"):
        read_manifest(work)


def test_manifests_of_the_previous_format_say_re_export(work):
    edit(work, lambda m: m.update(format_version=2), reseal=False)
    with pytest.raises(HybridStitchError, match=f"format version 2; this hybridstitch reads version {FORMAT_VERSION}"):
        read_manifest(work)


@pytest.mark.parametrize("junk", ["[" * 100_000, "null", '{"format": "hybridstitch-engines", "format_version": 3}'])
def test_junk_manifests_are_refused(work, junk):
    with open(os.path.join(work, "manifest.json"), "w") as f:
        f.write(junk)
    with pytest.raises(HybridStitchError):
        read_manifest(work)


def test_a_graph_linked_from_outside_the_folder_is_refused(work, tmp_path):
    """The recorded hash matches (same bytes), but the file is not the folder's own."""
    outside = tmp_path / "outside.onnx.data"
    shutil.move(os.path.join(work, "large.onnx.data"), outside)
    os.symlink(outside, os.path.join(work, "large.onnx.data"))
    with pytest.raises(HybridStitchError, match="large.onnx.data resolves to .*outside the engine folder"):
        load_engines(work, num_threads=1)
    with pytest.raises(HybridStitchError, match="outside the engine folder"):
        load_engines(work, num_threads=1, verify_files=False)


def _deny(monkeypatch, path):
    """``path`` cannot be read: chmod 000, and (root reads anything) opening it raises as it would."""
    os.chmod(path, 0)
    real_open = open

    def guarded(p, *a, **k):
        if os.path.abspath(os.fspath(p)) == os.path.abspath(path):
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, *a, **k)

    monkeypatch.setattr(integrity, "open", guarded, raising=False)


def test_an_unreadable_graph_is_a_clear_error(work, monkeypatch):
    path = os.path.join(work, "small.onnx")
    os.utime(path)  # its stat moves: the file must be hashed, so read
    _deny(monkeypatch, path)
    try:
        with pytest.raises(HybridStitchError, match="small.onnx cannot be read .Permission denied.; check its permissions"):
            load_engines(work, num_threads=1)
    finally:
        os.chmod(path, 0o644)


def test_a_damaged_stamp_file_only_costs_a_hash(work):
    with open(os.path.join(work, STAMP_NAME), "w") as f:
        json.dump({os.path.abspath(os.path.join(work, "small.onnx")): ["not", "a", "stamp"], "x": 3}, f)
    load_engines(work, num_threads=1)


def test_the_manifest_on_disk_is_sealed_and_reads_back(tiny_engines):
    with open(os.path.join(tiny_engines[0], "manifest.json")) as f:
        raw = json.load(f)
    assert list(raw)[:3] == ["format", "format_version", "checksum"]
    assert sealed(raw) == raw  # sealing is idempotent: the checksum covers everything else
    assert read_manifest(tiny_engines[0]).to_dict() == {k: v for k, v in raw.items() if k != "checksum"}
