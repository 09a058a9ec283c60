"""One report writer for every benchmark: ``<stem>.json``, ``.md`` and an optional ``.png``.

Each file is written atomically (:mod:`hybridstitch.fileio`), so a run killed mid-write leaves
the previous report whole; the folder is created when missing.
"""

from __future__ import annotations

import io
import json
import os

from hybridstitch.fileio import atomic_write_bytes, atomic_write_text


def write_report(stem: str | os.PathLike, data: dict, markdown: str | None = None, png: bytes | None = None) -> list[str]:
    """Write ``data`` as ``<stem>.json`` and, when given, ``<stem>.md`` and ``<stem>.png``.

    Returns the paths written, in that order.
    """
    stem = os.fspath(stem)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    written = [stem + ".json"]
    atomic_write_text(written[0], json.dumps(data, indent=2) + "\n")
    if markdown is not None:
        written.append(stem + ".md")
        atomic_write_text(written[-1], markdown if markdown.endswith("\n") else markdown + "\n")
    if png is not None:
        written.append(stem + ".png")
        atomic_write_bytes(written[-1], png)
    return written


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: reports render on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed (figures are kept alive by pyplot)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return buf.getvalue()
