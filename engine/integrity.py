"""Integrity checks that read a multi-GB file at most once per change.

An engine set's files (tens of GB at real size) and its source checkpoints are checked against
the sha256 recorded when they were written. Hashing them on every load would read them twice
(once to hash, once to load). Instead each record also holds the file's ``stat`` as it was when
hashed -- size, mtime, ctime, inode, device -- and a file whose stat is unchanged is the file that
was hashed: any write to its content moves its ctime, which no user can set back (``touch -d``
and ``os.utime`` set mtime only, and bump ctime to now). Only a file whose stat moved (edited,
copied to another folder, restored from a backup) is hashed, and the stat it has then is kept in
the engine folder's stamp file (when the folder is writable) so the next load trusts it.

    verifier = Verifier(folder)
    why = verifier.check(path, size=..., sha256=..., recorded_stat=...)   # None: intact
    verifier.save()                                                       # remember what was hashed
"""

from __future__ import annotations

import hashlib
import json
import os

from hybridstitch.fileio import atomic_write_text

STAMP_NAME = ".hybridstitch-verified.json"
STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (weights and engines can be tens of GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def file_stat(path: str) -> dict[str, int]:
    """What identifies a file's current content without reading it (see the module docstring)."""
    st = os.stat(path)
    return dict(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, ino=st.st_ino, dev=st.st_dev)


def same_file(stat: dict, recorded: dict | None) -> bool:
    return isinstance(recorded, dict) and bool(recorded) and all(stat.get(k) == recorded.get(k) for k in STAT_FIELDS)


def inside_folder(folder: str, name: str) -> str | None:
    """Why ``folder/name`` is not a path inside ``folder`` (None when it is): an absolute name, a
    ``..`` that climbs out, or a link that resolves outside. Touches nothing."""
    root = os.path.realpath(folder)
    if os.path.isabs(name):
        return f"{name} is an absolute path; an engine folder's files are named relative to it"
    real = os.path.realpath(os.path.join(folder, name))
    if os.path.commonpath([root, real]) != root or real == root:
        return f"{name} resolves to {real}, outside the engine folder {folder}"
    return None


def _unreadable(name: str, e: OSError) -> str:
    return f"{name} cannot be read ({e.strerror or e}); check its permissions"


class Verifier:
    """Checks files against their recorded size and sha256, hashing only files whose stat moved since
    they were last hashed (at export, or by an earlier load of this folder: its stamp file)."""

    def __init__(self, folder: str | None = None):
        self.path = os.path.join(folder, STAMP_NAME) if folder else None
        self.stamps: dict[str, dict] = {}
        self.hashed: list[str] = []  # files this verifier read in full (for tests and load reports)
        self._dirty = False
        if self.path and os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    loaded = json.load(f)
                self.stamps = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError, RecursionError):
                self.stamps = {}  # a damaged stamp file only costs a hash

    def check(self, path: str, size: int, sha256: str, recorded_stat: dict | None = None, hash_files: bool = True,
              name: str | None = None, recorded_at: str = "export") -> str | None:
        """Why ``path`` is not the file recorded (missing, resized, other sha256), or None. Reads at most once."""
        name = name or os.path.basename(path)
        try:
            if not os.path.isfile(path):
                return f"{name} is missing"
            stat = file_stat(path)
        except OSError as e:
            return _unreadable(name, e)
        if stat["size"] != size:
            return f"{name} is {stat['size']} bytes, {size} when built (truncated or replaced)"
        if not hash_files:
            return None
        key = os.path.abspath(path)
        stamp = self.stamps.get(key)
        if same_file(stat, recorded_stat) or (same_file(stat, stamp) and stamp.get("sha256") == sha256):
            return None
        self.hashed.append(key)
        try:
            digest = sha256_file(path)
        except OSError as e:
            return _unreadable(name, e)
        if digest != sha256:
            return f"{name} is corrupted (sha256 differs from the one recorded at {recorded_at})"
        self.stamps[key] = dict(stat, sha256=sha256)
        self._dirty = True
        return None

    def save(self) -> None:
        """Remember the files hashed by this verifier, so the next load reads them once only. Best
        effort: a read-only engine folder just keeps hashing moved files."""
        if not (self._dirty and self.path):
            return
        try:
            # the temporary carries the project's marker, so an export of the folder knows it for its own
            atomic_write_text(self.path, json.dumps(self.stamps, indent=1, sort_keys=True) + "\n",
                              prefix=".tmp-hybridstitch-verified-")
            self._dirty = False
        except OSError:
            pass


__all__ = ["STAMP_NAME", "Verifier", "file_stat", "inside_folder", "same_file", "sha256_file"]
