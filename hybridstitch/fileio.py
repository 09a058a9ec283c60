"""Atomic file writes: a temp file in the same folder, then a rename.

Readers never see half a file, and a failure leaves the earlier file intact.
"""

from __future__ import annotations

import os
import tempfile


def atomic_write_bytes(path: str | os.PathLike, data: bytes, prefix: str = ".tmp-") -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file.
    ``prefix``: the temp file's name starts with it (a writer that cleans up after itself marks its own)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, prefix: str = ".tmp-") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), prefix=prefix)
