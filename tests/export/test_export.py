"""hybridstitch-export: the graphs, the CachedKVAttention node, the manifest, resuming and refusing.

Relative error throughout: ``max|a - b| / max|b|`` with ``b`` the torch result.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hybridstitch import HybridStitchError
from hybridstitch.engine.torch_backend import TorchDenoiser
from hybridstitch.export import ExportRequest, export_engines, read_manifest
from hybridstitch.export import driver, onnx_steps
from hybridstitch.export.cli import main as cli_main
from hybridstitch.export.graphs import FullGraph, FullLargeGraph, GraphShapes, MaskedLargeGraph, example_inputs
from hybridstitch.engine.manifest import FORMAT_VERSION, sealed
from hybridstitch.loading import load_transformer
from hybridstitch.plugins import OP_DOMAIN, OP_NAME, cached_kv_attention, cached_kv_attention_reference, export_mode
from hybridstitch.plugins.onnx_op import attach_function, custom_translation_table

SHAPES = GraphShapes(batch=2, latent_height=8, latent_width=8, text_tokens=7)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def snapshot(folder):
    """Every file under ``folder``: (size, mtime, sha256)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (os.path.getsize(p), os.stat(p).st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


@pytest.fixture(scope="module")
def torch_models(tiny_dirs):
    return (TorchDenoiser(load_transformer(tiny_dirs[0], "large"), "large"),
            TorchDenoiser(load_transformer(tiny_dirs[1], "small"), "small"))


# -- the op on its own --------------------------------------------------------------------------------


class _Op(torch.nn.Module):
    def forward(self, q, k, v, ck, cv, idx):
        return cached_kv_attention(q, k, v, ck, cv, idx)


@pytest.mark.parametrize("text_tokens,opset", [(5, 18), (0, 18), (5, 23)])
def test_op_exports_as_one_custom_node_that_onnxruntime_runs(text_tokens, opset):
    """One node of the custom domain, its local function at the model's opset; ORT runs it (T = 0 is attn2)."""
    b, h, n, d, k = 2, 3, 20, 8, 6
    g = torch.Generator().manual_seed(0)
    q, key, v = (torch.randn(b, h, k + text_tokens, d, generator=g) for _ in range(3))
    ck, cv = (torch.randn(b, h, n, d, generator=g) for _ in range(2))
    idx = torch.stack([torch.sort(torch.randperm(n, generator=g)[:k]).values for _ in range(b)])
    names = ["query", "key", "value", "cache_k", "cache_v", "index"]
    with export_mode(), torch.no_grad():
        program = torch.onnx.export(_Op().eval(), (q, key, v, ck, cv, idx), dynamo=True, opset_version=opset,
                                    custom_translation_table=custom_translation_table(), input_names=names,
                                    output_names=["out", "new_k", "new_v"], verbose=False)
    model = program.model_proto
    attach_function(model)
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(OP_DOMAIN, OP_NAME)]
    (fn,) = model.functions
    assert (fn.domain, fn.name) == (OP_DOMAIN, OP_NAME)
    assert {o.domain: o.version for o in fn.opset_import}[""] == opset
    assert {o.domain: o.version for o in model.opset_import} == {"": opset, OP_DOMAIN: 1}
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip(names, (t.numpy() for t in (q, key, v, ck, cv, idx)))))
    want = cached_kv_attention_reference(q, key, v, ck, cv, idx)
    for a, w in zip(got, want):
        assert rel(a, w) < 1e-6


def test_export_mode_leaves_the_torch_op_bit_identical():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(1, 2, 9, 4, generator=g) for _ in range(3)] + [torch.randn(1, 2, 12, 4, generator=g) for _ in range(2)]
    idx = torch.tensor([[1, 4, 7, 8]])
    ref = cached_kv_attention_reference(*args, idx)
    for a, b in zip(cached_kv_attention(*args, idx), ref):
        assert torch.equal(a, b)
    with export_mode():
        inside = cached_kv_attention(*args, idx)  # eager calls of the export op run the reference
    for a, b in zip(inside, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- the engine set --------------------------------------------------------------------------------------


def test_manifest_records_the_export(tiny_engines, tiny_dirs):
    folder, req = tiny_engines
    with open(os.path.join(folder, "manifest.json")) as f:
        raw = json.load(f)
    assert raw["format"] == "hybridstitch-engines" and raw["format_version"] == FORMAT_VERSION
    m = read_manifest(folder)
    assert m.complete and m.created and m.precision == "fp32" and m.opset == 18 and m.batch == 2
    assert m.backend == {"name": "onnxruntime", "version": ort.__version__}
    assert m.resolution == dict(height=64, width=64, latent_height=8, latent_width=8, vae_scale_factor=8)
    assert m.tokens == {"image": 16, "text": 7}
    assert [(b.ratio, b.masked_tokens) for b in m.buckets] == [(0.1, 2), (0.3, 5)]  # ceil(r * 16)
    for role, path in zip(("large", "small"), tiny_dirs):
        info = m.models[role]
        assert info["path"] == os.path.abspath(path)
        st = os.path.join(info["transformer_dir"], "diffusion_pytorch_model.safetensors")
        with open(st, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        assert digest in [x["sha256"] for x in info["weights"]["files"]]
        assert info["config"]["num_layers"] == m.spec(role).num_layers
    assert set(m.graphs) == {"small", "large"}  # the large weights exist once
    slots = m.spec("large").attention_slots  # 3 layers + one attn2: 4 slots
    assert len(slots) == 4
    large = m.graphs["large"]
    caches = [f"cache_{kv}.{l}.{a}" for l, a in slots for kv in "kv"]
    assert [t.name for t in large.inputs] == ["latents", "index", "prompt_embeds", "pooled", "timestep", *caches]
    assert large.inputs[1].shape == ["batch", "k"] and large.inputs[1].dtype == "int64"
    assert large.inputs[5].shape == ["batch", 4, 16, 8]  # [B, H, N, D]
    assert [t.name for t in large.outputs] == ["tokens", *[f"new_{c}" for c in caches]]  # bound by name
    assert large.outputs[0].shape == ["batch", "k", 64]
    assert m.graphs["small"].inputs[0].shape == ["batch", 16, 8, 8]
    assert large.custom_nodes == 4 and m.graphs["small"].custom_nodes == 0
    for name, entry in m.graphs.items():
        assert entry.file == f"{name}.onnx" and entry.external_data == f"{name}.onnx.data"  # weights outside
        assert [f["name"] for f in entry.files] == [entry.file, entry.external_data]
        assert entry.check_files(folder) is None


def test_large_graph_holds_one_custom_node_per_slot_with_its_function(tiny_engines):
    folder, _ = tiny_engines
    model = onnx.load(os.path.join(folder, "large.onnx"))
    custom = [n for n in model.graph.node if n.domain == OP_DOMAIN]
    assert len(custom) == 4 and {n.op_type for n in custom} == {OP_NAME}
    assert [(f.domain, f.name) for f in model.functions] == [(OP_DOMAIN, OP_NAME)]
    onnx.checker.check_model(model, full_check=True)
    small = onnx.load(os.path.join(folder, "small.onnx"))
    assert not [n for n in small.graph.node if n.domain == OP_DOMAIN] and not small.functions


def test_the_large_weights_are_stored_once(tiny_engines, tiny_dirs):
    """The export's large graph holds about the checkpoint's weight bytes (issue: <= 1.2x), not one copy per bucket."""
    folder, _ = tiny_engines
    import onnx_ir as ir

    model = ir.load(os.path.join(folder, "large.onnx"))
    graph_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    params = sum(p.numel() * 4 for p in load_transformer(tiny_dirs[0], "large").parameters())
    assert 0.99 * params <= graph_bytes <= 1.2 * params


def _feeds(sess, arrays):
    return {i.name: a for i, a in zip(sess.get_inputs(), arrays)}


def test_small_graph_matches_torch_at_any_batch(tiny_engines, torch_models):
    folder, _ = tiny_engines
    _, small = torch_models
    sess = session(os.path.join(folder, "small.onnx"))
    for batch in (1, 2, 5):
        ex = example_inputs("small", small.spec, SHAPES, torch.float32, seed=3, batch=batch)
        got = sess.run(None, _feeds(sess, [x.numpy() for x in ex]))
        with torch.no_grad():
            want = FullGraph(small)(*ex)
        assert rel(got[0], want) < 1e-5, batch


@pytest.mark.parametrize("k", [1, 2, 5, 16])
@pytest.mark.parametrize("cache", ["fresh", "stale"])
def test_large_graph_matches_torch_at_any_k(tiny_engines, torch_models, k, cache):
    """Fresh: caches from a full forward at the same inputs (then the masked output also equals the
    full output at the masked tokens). Stale: caches from another latent and timestep. k = 16 = N
    with every position is the full step: tokens = the full forward's, caches = its caches."""
    folder, _ = tiny_engines
    large, _ = torch_models
    ex = example_inputs("large", large.spec, SHAPES, torch.float32, masked_tokens=k, seed=5, batch=3)
    latents, index, pe, pooled, t = ex[:5]
    with torch.no_grad():
        if cache == "fresh":
            full = FullLargeGraph(large)(latents, pe, pooled, t)
        else:
            full = FullLargeGraph(large)(latents + 0.5 * torch.randn_like(latents), pe, pooled, t * 0.8)
        caches = full[1:]
        want = MaskedLargeGraph(large)(latents, index, pe, pooled, t, *caches)
    sess = session(os.path.join(folder, "large.onnx"))
    got = sess.run(None, _feeds(sess, [x.numpy() for x in (latents, index, pe, pooled, t, *caches)]))
    errors = [rel(a, w) for a, w in zip(got, want)]
    assert max(errors) < 1e-5, errors
    if cache == "fresh":
        from hybridstitch.tokens import gather_tokens, patchify

        assert rel(got[0], gather_tokens(patchify(full[0], 2), index)) < 1e-5
        if k == 16:  # the full step: every cache row is the full forward's
            assert max(rel(a, w) for a, w in zip(got[1:], full[1:])) < 1e-5


# -- rerun, resume, refuse ------------------------------------------------------------------------------


def test_rerun_skips_valid_engines(tiny_engines, tmp_path, monkeypatch):
    folder, req = tiny_engines
    work = str(tmp_path / "eng")
    shutil.copytree(folder, work)
    before = snapshot(work)
    built = []
    monkeypatch.setattr(driver, "_build_graph", lambda g, *a, **k: built.append(g.name))
    export_engines(req, work, progress=False)
    assert built == []
    assert snapshot(work) == before  # nothing rewritten, not even the manifest


def test_damaged_engine_is_rebuilt_alone(tiny_engines, tmp_path):
    folder, req = tiny_engines
    work = str(tmp_path / "eng")
    shutil.copytree(folder, work)
    with open(os.path.join(work, "small.onnx"), "r+b") as f:
        f.truncate(1000)
    before = snapshot(work)
    export_engines(req, work, progress=False)
    after = snapshot(work)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"small.onnx", "small.onnx.data", "manifest.json"}
    m = read_manifest(work)
    assert m.complete and m.graphs["small"].check_files(work) is None


def test_interrupted_export_resumes_and_a_failure_keeps_earlier_engines(tiny_engines, tmp_path, monkeypatch):
    folder, req = tiny_engines
    work = str(tmp_path / "eng")
    shutil.copytree(folder, work)
    # as if the export stopped after the first graph: the large one never made it
    with open(os.path.join(work, "manifest.json")) as f:
        raw = json.load(f)
    raw["complete"] = False
    del raw["graphs"]["large"]
    os.unlink(os.path.join(work, "large.onnx"))
    os.unlink(os.path.join(work, "large.onnx.data"))
    with open(os.path.join(work, "manifest.json"), "w") as f:
        json.dump(sealed(raw), f)
    before = snapshot(work)

    def boom(self):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_steps.OnnxFromGraph, "__call__", boom)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_engines(req, work, progress=False)
    assert snapshot(work) == before  # earlier engines and manifest intact, no temp files left
    monkeypatch.undo()

    export_engines(req, work, progress=False)
    after = snapshot(work)
    assert {k for k in after if after[k] != before.get(k)} == {"large.onnx", "large.onnx.data", "manifest.json"}
    assert read_manifest(work).complete


def test_folder_of_another_configuration_is_refused_untouched(tiny_engines, tmp_path):
    folder, req = tiny_engines
    work = str(tmp_path / "eng")
    shutil.copytree(folder, work)
    before = snapshot(work)
    for change in (dict(height=128, width=128), dict(precision="fp16"), dict(text_tokens=9)):
        other = ExportRequest(**{**vars(req), **change})
        with pytest.raises(HybridStitchError, match="another configuration"):
            export_engines(other, work, progress=False)
    assert snapshot(work) == before


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(buckets=(0.0, 0.3)), "bucket ratios must be in"),
        (dict(precision="fp8"), "precision"),
        (dict(batch=0), "batch"),
        (dict(height=60), "multiples of 16"),
        (dict(height=512, width=512), "positional embedding"),
        (dict(opset=17), "opset"),
        (dict(backend="tensorrt"), "TensorRT is not installed"),
    ],
)
def test_bad_requests_write_nothing(tiny_dirs, tmp_path, change, match):
    if change.get("backend") == "tensorrt":
        import importlib.util

        if importlib.util.find_spec("tensorrt") is not None:
            pytest.skip("TensorRT is installed")
    out = tmp_path / "eng"
    base = dict(large=tiny_dirs[0], small=tiny_dirs[1], height=64, width=64, batch=2, buckets=(0.3,), text_tokens=7)
    with pytest.raises(HybridStitchError, match=match):
        export_engines(ExportRequest(**{**base, **change}), str(out), progress=False)
    assert not out.exists()


def test_external_data_round_trip(tiny_engines, tmp_path):
    """Graphs above the threshold (2 GB in use; 0 here) are saved as .onnx + .onnx.data and still run."""
    import onnx_ir as ir

    folder, _ = tiny_engines
    model = ir.load(os.path.join(folder, "large.onnx"))
    files, data = onnx_steps.FilesFromOnnx(model, str(tmp_path), "big", external_data_threshold=0)()
    assert data == "big.onnx.data" and [f["name"] for f in files] == ["big.onnx", "big.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]  # no temp folder left
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert os.path.getsize(tmp_path / "big.onnx.data") > 0.9 * weights
    a, b = session(os.path.join(folder, "large.onnx")), session(str(tmp_path / "big.onnx"))
    rng = np.random.default_rng(0)
    feeds = {}
    for i in a.get_inputs():
        shape = [{"batch": 2, "k": 5}.get(d, d) for d in i.shape]
        feeds[i.name] = (np.sort(rng.permutation(16)[:5])[None].repeat(2, 0) if i.name == "index"
                         else rng.standard_normal(shape).astype(np.float32))
    for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
        np.testing.assert_array_equal(x, y)


def test_cli(tiny_engines, tiny_dirs, tmp_path, capsys):
    folder, _ = tiny_engines
    work = str(tmp_path / "eng")
    shutil.copytree(folder, work)
    args = ["--large", tiny_dirs[0], "--small", tiny_dirs[1], "--height", "64", "--width", "64", "--batch", "2",
            "--buckets", "0.1", "0.3", "--text-tokens", "7", "--out", work, "--quiet"]
    assert cli_main(args) == 0  # everything up to date
    assert json.loads(capsys.readouterr().out)["engines"] == ["large", "small"]
    assert cli_main([*args, "--text-tokens", "9"]) == 2
    assert "another configuration" in capsys.readouterr().err
