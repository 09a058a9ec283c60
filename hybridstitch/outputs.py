"""Checks of output paths, made before any work: a command that would fail to write its result
(a folder where a file goes, a file where a folder goes, a folder it may not write in) fails
first, with nothing computed and nothing written.
"""

from __future__ import annotations

import os

from .errors import HybridStitchError


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_writable_parent(path: str, flag: str) -> None:
    """The folder ``path`` would be created in exists as a folder (or can be made) and is writable."""
    anchor = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(anchor):
        raise HybridStitchError(f"{flag} {path}: {anchor} is a file, so no folder can be made there; choose another path")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise HybridStitchError(f"{flag} {path}: cannot write in {anchor} (permission denied); choose another path")


def check_output_file(path: str, flag: str, example: str = "image.png") -> None:
    """``path`` can be written as a file (an existing file there is replaced); ``example`` names a
    file the message suggests when ``path`` is a folder."""
    if not path:
        raise HybridStitchError(f"{flag} is empty; give a file path")
    if os.path.isdir(path):
        raise HybridStitchError(
            f"{flag} {path} is a folder; give a file path (e.g. {os.path.join(path, example)})"
        )
    _check_writable_parent(path, flag)


def check_output_folder(path: str, flag: str) -> None:
    """``path`` is a folder, or can be made as one, that can be written in."""
    if not path:
        raise HybridStitchError(f"{flag} is empty; give a folder path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise HybridStitchError(f"{flag} {path} is a file, not a folder; give a folder path (it is made if missing)")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise HybridStitchError(f"{flag} {path}: cannot write in it (permission denied); choose another folder")
        return
    _check_writable_parent(path, flag)


__all__ = ["check_output_file", "check_output_folder"]
