"""The engine folder as the export writes it: its lock, its temporary entries, and the swap that
replaces it whole.

* :class:`FolderLock` -- one export at a time per folder. A lock file in the folder
  (``.hybridstitch-export.lock``) is held with ``flock`` for the whole export; a second export
  waits up to ``wait`` seconds, then is refused with what to do. The kernel drops the lock when
  its process dies, so a killed export never leaves the folder locked. (``fcntl`` directly rather
  than the ``filelock`` package: an ``--overwrite`` export replaces the folder, lock file
  included, so a waiter must check that the file it locked is still the one at the path and
  retry otherwise -- a check ``filelock``'s releases have handled differently over time.)
* :func:`remove_stale_temporaries` -- what a killed export left: entries carrying
  :data:`~hybridstitch.engine.manifest.EXPORT_TMP_PREFIX`, in the folder and (staging folders of
  ``--overwrite``) beside it. Nothing else is touched: a user's ``.tmp-notes`` stays.
* :func:`staging_folder` / :func:`swap_in` -- ``--overwrite`` builds the new engine set in a
  sibling folder and swaps it in at the end (one atomic exchange on Linux), so a failed or
  interrupted export leaves the earlier engines intact and loadable.
* :func:`foreign_entries` -- what in a folder no export wrote (the demo and ``--overwrite``
  never replace those).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import tempfile
import time

from hybridstitch.engine.builds import TENSORRT_DIR
from hybridstitch.engine.integrity import STAMP_NAME
from hybridstitch.engine.manifest import EXPORT_TMP_PREFIX, MANIFEST_NAME
from hybridstitch.errors import HybridStitchError

LOCK_NAME = ".hybridstitch-export.lock"
# The graphs an export writes, of every manifest version (small, large; version 1 also full_large
# and large_masked_<percent>), and their external data.
_GRAPH_FILE = re.compile(r"(small|large|full_large|large_masked_[0-9.]+)\.onnx(\.data)?")


def is_export_entry(name: str, with_manifest: bool = True) -> bool:
    """Whether ``name`` (an entry of an engine folder) is one an export writes. Without a manifest
    (``with_manifest=False``) only the lock, the stamp file and marked temporaries count: graph
    files no manifest claims may be anyone's (``small.onnx`` is a common name)."""
    if name in (STAMP_NAME, LOCK_NAME) or name.startswith(".tmp-hybridstitch-"):
        return True
    return with_manifest and (name in (MANIFEST_NAME, TENSORRT_DIR) or bool(_GRAPH_FILE.fullmatch(name)))


def foreign_entries(folder: str, with_manifest: bool = True) -> list[str]:
    """The entries of ``folder`` that no export wrote (sorted); see :func:`is_export_entry`."""
    return sorted(n for n in os.listdir(folder) if not is_export_entry(n, with_manifest))


# -- the lock -------------------------------------------------------------------------------------------------


class FolderLock:
    """Exclusive lock of an engine folder for one export (a context manager); see the module docstring.

    ``wait``: seconds to wait for another export to finish (0: refuse at once; None: no limit)."""

    def __init__(self, folder: str, wait: float | None = 0.0, poll: float = 0.2):
        self.folder, self.wait, self.poll = folder, wait, poll
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # no flock (Windows): exports are not serialised there
            return self
        deadline = None if self.wait is None else time.monotonic() + max(0.0, self.wait)
        while True:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    waited = f"waited {self.wait:g} s; " if self.wait else ""
                    raise HybridStitchError(
                        f"another hybridstitch-export is writing into {self.folder} (it holds {self.path}); "
                        f"{waited}let it finish and rerun (a rerun skips what it built), or pass --wait SECONDS "
                        "to wait for it"
                    ) from None
                time.sleep(self.poll)
                continue
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                self._fd = fd
                return self
            os.close(fd)  # the folder was replaced (an --overwrite swap) while we waited: lock the new one

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


# -- temporaries ---------------------------------------------------------------------------------------------


def _staging_pattern(folder: str) -> re.Pattern:
    base = os.path.basename(os.path.normpath(folder))
    return re.compile(re.escape(f"{EXPORT_TMP_PREFIX}{base}") + r"\.(new|old)\.[A-Za-z0-9_]{8}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove what killed exports of ``folder`` left (call it holding the folder's lock, so no other
    export of it is running): entries carrying the export's prefix inside it, and its staging
    folders beside it. Returns the paths removed."""
    removed = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(EXPORT_TMP_PREFIX):
                removed.append(os.path.join(folder, name))
    parent = os.path.dirname(os.path.abspath(folder))
    pattern = _staging_pattern(folder)
    try:
        siblings = os.listdir(parent)
    except OSError:
        siblings = []
    removed += [os.path.join(parent, n) for n in siblings if pattern.fullmatch(n)]
    for path in removed:
        _remove(path)
    return removed


# -- --overwrite: build beside, swap in --------------------------------------------------------------------------


def staging_folder(folder: str) -> str:
    """A new, empty sibling of ``folder`` to build a replacement in (removed by :func:`swap_in`, or by
    the next export if this one is killed)."""
    base = os.path.basename(os.path.normpath(folder))
    staging = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(folder)), prefix=f"{EXPORT_TMP_PREFIX}{base}.new.")
    if os.path.isdir(folder):  # mkdtemp makes it 0700: the swapped-in folder keeps the old one's permissions
        shutil.copymode(folder, staging)
    return staging


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def swap_in(staging: str, folder: str) -> None:
    """Replace ``folder`` by ``staging`` (a complete engine set beside it), then remove the old one.

    One atomic exchange where the system has it; else two renames, the old folder put back if the
    second fails. Either way a loader sees the old set or the new one, never a mix."""
    if _exchange(staging, folder):
        shutil.rmtree(staging, ignore_errors=True)  # now the old set
        return
    base = os.path.basename(os.path.normpath(folder))
    old = os.path.join(os.path.dirname(os.path.abspath(folder)), f"{EXPORT_TMP_PREFIX}{base}.old.{secrets.token_hex(4)}")
    os.rename(folder, old)
    try:
        os.rename(staging, folder)
    except BaseException as e:
        try:
            os.rename(old, folder)
        except OSError:
            raise HybridStitchError(
                f"could not swap the new engines into {folder} ({e}); the earlier engines are in {old}, the new in "
                f"{staging}: move one of them to {folder}"
            ) from e
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["FolderLock", "LOCK_NAME", "foreign_entries", "is_export_entry", "remove_stale_temporaries", "staging_folder",
           "swap_in"]
