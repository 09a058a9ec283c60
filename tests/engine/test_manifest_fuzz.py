"""Property test over the manifest's fields (issue 15): any field of a real engine folder's
manifest set to any JSON value, or removed, with the checksum resealed as a careless writer would,
ends in a HybridStitchError naming the problem, or loads engines -- never a raw exception, and
no file in the folder changes (but the loader's own record of the files it verified,
``.hybridstitch-verified.json``, which a refusal after the hashes were checked may write).

Few examples, derandomized, no deadline: a refusal is a manifest read, a success one load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hybridstitch import HybridStitchError
from hybridstitch.engine.integrity import STAMP_NAME
from hybridstitch.engine.manifest import sealed
from hybridstitch.engine.onnxruntime_backend import load_engines
from tests.engine.test_onnxruntime_backend import snapshot


def field_paths(node, prefix=()) -> list[tuple]:
    """Every field of the manifest, inner ones included, as key paths."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        if prefix == () and key == "checksum":
            continue  # resealed below: the checksum's own refusal is tested in test_manifest.py
        out.append((*prefix, key))
        out += field_paths(child, (*prefix, key))
    return out


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                         st.sampled_from(["../x", "/etc/passwd", "large.onnx", "fp16", "", "nan", "-1"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)
DELETE = object()


def files(folder: str) -> dict:
    """The folder's files and their contents, but the loader's record of what it verified."""
    return {name: v for name, v in snapshot(folder).items() if name != STAMP_NAME}


def mutate(raw: dict, path: tuple, value) -> None:
    node = raw
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


def test_any_field_set_to_anything_is_refused_clearly_or_loads(tiny_engines):
    with open(os.path.join(tiny_engines[0], "manifest.json")) as f:
        original = json.load(f)
    paths = field_paths(original)

    @settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(path=st.sampled_from(paths), value=st.one_of(JSON_VALUES, st.just(DELETE)))
    def check(path, value):
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "eng")
            shutil.copytree(tiny_engines[0], folder)
            raw = json.loads(json.dumps(original))
            mutate(raw, path, value)
            with open(os.path.join(folder, "manifest.json"), "w") as f:
                f.write(json.dumps(sealed(raw), allow_nan=True))
            before = files(folder)
            try:
                engines = load_engines(folder, num_threads=1)
            except HybridStitchError as e:
                assert type(e) is HybridStitchError and str(e).strip()
                assert files(folder) == before, f"a refused manifest changed files ({path})"
                event("refused")
                return
            event("loaded")
            del engines
            assert files(folder) == before, f"loading changed files ({path})"

    check()
