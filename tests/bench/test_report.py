"""The report writer: the files written, and the earlier report left whole when writing fails."""

import json

import pytest

from hybridstitch.bench.report import figure_png, pyplot, write_report


def test_writes_json_markdown_and_png(tmp_path):
    fig = pyplot().figure()
    png = figure_png(fig)
    written = write_report(tmp_path / "sub" / "r", {"a": [1, 2]}, "# title", png)
    assert written == [str(tmp_path / "sub" / f"r.{ext}") for ext in ("json", "md", "png")]
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"a": [1, 2]}
    assert (tmp_path / "sub" / "r.md").read_text() == "# title\n"
    assert (tmp_path / "sub" / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert not pyplot().fignum_exists(fig.number)  # closed: reports in a loop do not pile up figures


def test_only_json_when_nothing_else_is_given(tmp_path):
    assert write_report(tmp_path / "r", {}) == [str(tmp_path / "r.json")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_failed_write_leaves_the_earlier_report(tmp_path):
    write_report(tmp_path / "r", {"ok": True}, "old")
    with pytest.raises(TypeError):
        write_report(tmp_path / "r", {"bad": object()}, "new")
    assert json.loads((tmp_path / "r.json").read_text()) == {"ok": True}
    assert (tmp_path / "r.md").read_text() == "old\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
