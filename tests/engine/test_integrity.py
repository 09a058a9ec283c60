"""Loading reads each file once: a file is hashed only when its stat moved since it was hashed,
and no edit can keep its stat (ctime moves on any write; it cannot be set back)."""

import os
import shutil

import pytest

from hybridstitch import HybridStitchError
from hybridstitch.engine import integrity
from hybridstitch.engine.integrity import STAMP_NAME, Verifier, sha256_file
from hybridstitch.engine.onnxruntime_backend import load_engines


@pytest.fixture
def hashes(monkeypatch):
    """Every file the integrity checks read in full."""
    seen = []
    real = integrity.sha256_file

    def counting(path, *a, **k):
        seen.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    return seen


def test_the_exported_folder_loads_without_hashing(tiny_engines, hashes):
    load_engines(tiny_engines[0], num_threads=1)
    assert hashes == []  # every file's stat is the one recorded when the export hashed it


def test_a_copied_folder_is_hashed_once_then_trusted(tiny_engines, tiny_dirs, tmp_path, hashes):
    work = str(tmp_path / "eng")
    shutil.copytree(tiny_engines[0], work)  # new inodes, new ctimes: nothing vouches for the files yet
    load_engines(work, num_threads=1)
    assert sorted(hashes) == ["large.onnx", "large.onnx.data", "small.onnx", "small.onnx.data"]
    assert os.path.isfile(os.path.join(work, STAMP_NAME))
    hashes.clear()
    load_engines(work, num_threads=1)
    assert hashes == []


def test_an_edit_that_restores_size_and_mtime_is_still_caught(tiny_engines, tmp_path):
    work = str(tmp_path / "eng")
    shutil.copytree(tiny_engines[0], work)
    load_engines(work, num_threads=1)  # stamps the copy
    path = os.path.join(work, "large.onnx.data")
    before = os.stat(path)
    with open(path, "r+b") as f:  # same size, other bytes
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back; ctime cannot be
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns and os.stat(path).st_size == before.st_size
    with pytest.raises(HybridStitchError, match="large.onnx.data is corrupted"):
        load_engines(work, num_threads=1)


def test_a_stamp_never_vouches_for_another_hash(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    v = Verifier(str(tmp_path))
    good = sha256_file(str(path))
    assert v.check(str(path), 3000, good) is None
    v.save()
    again = Verifier(str(tmp_path))
    assert again.check(str(path), 3000, good) is None and again.hashed == []  # trusted by its stamp
    assert "corrupted" in again.check(str(path), 3000, "0" * 64)  # another recorded hash: read it again
    assert Verifier(str(tmp_path)).check(str(path), 3001, good).startswith("f.bin is 3000 bytes")


def test_a_read_only_folder_still_loads(tiny_engines, tmp_path):
    work = str(tmp_path / "eng")
    shutil.copytree(tiny_engines[0], work)
    os.chmod(work, 0o555)
    try:
        if os.access(work, os.W_OK):
            pytest.skip("running as a user who can write into read-only folders (root)")
        load_engines(work, num_threads=1)  # hashes, cannot stamp, loads anyway
        assert not os.path.exists(os.path.join(work, STAMP_NAME))
    finally:
        os.chmod(work, 0o755)
