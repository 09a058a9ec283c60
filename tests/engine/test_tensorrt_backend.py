"""The TensorRT backend: loading, refusals, buffers, bindings and the device cache.

On CPU the engines are fakes (``tests/tensorrt_fakes.py``): ONNX Runtime runs the graph TensorRT
would have parsed, through the very addresses the backend binds with ``set_tensor_address``, so
everything but TensorRT itself is exercised and compared with the torch backend. The tests marked
``gpu`` build and run real engines and skip without TensorRT and a CUDA GPU.

Relative error throughout: ``max|a - b| / max|b|`` with ``b`` the torch result.
"""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from hybridstitch import HybridStitchError, HybridStitchPipeline, StitchConfig
from hybridstitch.denoiser import MaskedDenoiser
from hybridstitch.engine import tensorrt_backend
from hybridstitch.engine.tensorrt_backend import TrtKVCache, load_engines
from hybridstitch.engine.builds import EngineTensor, TensorRTOptions
from hybridstitch.engine.manifest import read_manifest
from hybridstitch.export.onnx_steps import DenoiserFromCheckpoint
from hybridstitch.export.tensorrt_build import build_engines
from hybridstitch.masks import select_mask
from tests.engine.parity import assert_caches_match, assert_masked_parity, inputs, rel
from tests.engine.test_onnxruntime_backend import _run, snapshot, torch_pair  # noqa: F401
from tests.tensorrt_fakes import A100, ADA, TRT_VERSION, FakeRuntime, FakeToolchain

ADA_TARGET = "sm89-nvidia-rtx-6000-ada-generation"


def make_tensorrt_folder(ort_folder: str, dst: str, tiny_dirs, toolchain=None, **options) -> dict:
    """A copy of the ONNX Runtime export turned into a TensorRT export with fake engines
    (the graphs are the same; only the manifest's backend and the engines differ)."""
    shutil.copytree(ort_folder, dst)
    manifest = read_manifest(dst)
    manifest.backend = {"name": "tensorrt", "version": TRT_VERSION}
    manifest.save(dst)
    opts = TensorRTOptions(**options)
    plan = SimpleNamespace(request=SimpleNamespace(tensorrt=opts), manifest=manifest)
    loaders = {role: DenoiserFromCheckpoint(path, role, torch.float32) for role, path in zip(("large", "small"), tiny_dirs)}
    return build_engines(plan, dst, loaders, progress=False, toolchain=toolchain or FakeToolchain())


def load(folder, **kw):
    kw.setdefault("device_info", ADA)
    return load_engines(folder, device="cpu", runtime=kw.pop("runtime", FakeRuntime()), **kw)


@pytest.fixture(scope="module")
def trt_folder(tiny_engines, tiny_dirs, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("trt") / "engines")
    make_tensorrt_folder(tiny_engines[0], folder, tiny_dirs)
    return folder


@pytest.fixture(scope="module")
def engines(trt_folder):
    return load(trt_folder)


def test_denoisers_behind_the_interface(engines, torch_pair):
    large, small = torch_pair
    assert isinstance(engines.large, MaskedDenoiser)
    assert engines.large.backend == engines.small.backend == "tensorrt"
    assert engines.large.spec == large.spec and engines.small.spec == small.spec
    assert engines.build_id == f"{ADA_TARGET}/trt{TRT_VERSION}/onnx-plugin"
    assert engines.build["plugin"]["ptx_target"] == "sm_89"


def test_one_large_engine_with_a_profile_per_bucket_on_one_memory_block(engines):
    """One large engine (one copy of the weights): a static profile per bucket k plus k = N for the
    full step, one user-managed context each; every context of both engines shares one block."""
    large, small = engines.large.engine, engines.small.engine
    assert large.profile_sizes == [{"batch": 2, "k": 2}, {"batch": 2, "k": 5}, {"batch": 2, "k": 16}]
    assert small.profile_sizes == [{"batch": 2}]
    contexts = [p.context for p in [*large.profiles, *small.profiles]]
    assert [c.profile for c in contexts] == [0, 1, 2, 0] and all(c.user_managed for c in contexts)
    assert len({c.device_memory for c in contexts}) == 1  # one block ...
    assert engines.memory.size == max(large.memory_need(), small.memory_need())  # ... sized to the largest


def test_full_forwards_match_torch(engines, torch_pair):
    large, small = torch_pair
    x, pe, pooled, t = inputs()
    assert rel(engines.small.forward(x, pe, pooled, t), small.forward(x, pe, pooled, t)) < 1e-5
    cache, ref_cache = engines.large.new_cache(2, 8, 8), large.new_cache(2, 8, 8)
    assert rel(engines.large.forward(x, pe, pooled, t, cache=cache), large.forward(x, pe, pooled, t, cache=ref_cache)) < 1e-5
    kept = cache.to_torch()
    x2 = x + 1.0  # a full forward without a cache leaves the request's cache alone
    assert rel(engines.large.forward(x2, pe, pooled, t), large.forward(x2, pe, pooled, t)) < 1e-5
    assert_caches_match(cache, ref_cache)
    assert all(torch.equal(kept[n], got) for n, got in cache.to_torch().items())


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_masked_forward_fresh_and_stale_cache_match_torch(engines, torch_pair, ratio):
    assert_masked_parity(engines, torch_pair[0], ratio)


def test_buffers_are_allocated_once_and_bound_by_address(engines, trt_folder):
    """Inputs and outputs live in buffers made at load; the two cache sets are made once and swap."""
    x, pe, pooled, t = inputs(seed=3)
    large = engines.large
    cache = large.new_cache(2, 8, 8)
    assert isinstance(cache, TrtKVCache) and len(cache.current) == 8  # 4 slots x K, V
    sets_before = [{n: v.data_ptr() for n, v in s.items()} for s in cache.sets]
    full_profile, masked_profile = large.engine.profiles[2], large.engine.profiles[0]  # k = N, k = 2
    with pytest.raises(RuntimeError, match="full forward"):
        large.forward_masked(x, pe, pooled, t, torch.arange(2).repeat(2, 1), cache)
    read = cache.index
    large.forward(x, pe, pooled, t, cache=cache)
    full_buffers = {n: v.data_ptr() for buffers in full_profile.buffers.values() for n, v in buffers.items()}
    context = full_profile.context
    assert context.shapes["index"] == (2, 16) and context.addresses["latents"] == full_buffers["latents"]
    assert context.addresses["cache_k.0.attn"] == cache.sets[read]["cache_k.0.attn"].data_ptr()
    assert context.addresses["new_cache_k.0.attn"] == cache.current["cache_k.0.attn"].data_ptr()  # then swapped
    before = cache.to_torch()
    idx = torch.tensor([[0, 3], [5, 9]])
    first = cache.index
    large.forward_masked(x + 1.0, pe, pooled, t, idx, cache)
    masked_context = masked_profile.context
    assert masked_context.shapes["index"] == (2, 2)
    assert masked_context.addresses["cache_k.0.attn"] == cache.sets[first]["cache_k.0.attn"].data_ptr()
    assert masked_context.addresses["new_cache_k.0.attn"] == cache.sets[1 - first]["cache_k.0.attn"].data_ptr()
    assert cache.index == 1 - first  # swapped
    assert [{n: v.data_ptr() for n, v in s.items()} for s in cache.sets] == sets_before
    large.forward(x, pe, pooled, t, cache=cache)  # the full profile's buffers are made once
    assert {n: v.data_ptr() for buffers in full_profile.buffers.values() for n, v in buffers.items()} == full_buffers
    assert large.new_cache(2, 8, 8).sets is cache.sets  # the next request reuses them
    after = {n: cache.sets[1 - first][n].clone() for n in before}
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[0, [0, 3]] = keep[1, [5, 9]] = False
    for name in before:
        for b in range(2):
            assert torch.equal(after[name][b][:, keep[b]], before[name][b][:, keep[b]])
            assert not torch.allclose(after[name][b][:, ~keep[b]], before[name][b][:, ~keep[b]])


def test_one_request_at_a_time(engines):
    x, pe, pooled, t = inputs(seed=5)
    old = engines.large.new_cache(2, 8, 8)
    engines.large.new_cache(2, 8, 8)
    with pytest.raises(HybridStitchError, match="earlier request"):
        engines.large.forward(x, pe, pooled, t, cache=old)


def test_whole_run_matches_torch_through_from_engines(trt_folder, tiny_pipe, monkeypatch):
    """HybridStitchPipeline.from_engines routes a TensorRT folder to this backend (the manifest says so)."""
    real = tensorrt_backend.load_engines
    monkeypatch.setattr(tensorrt_backend, "load_engines",
                        lambda folder, **kw: real(folder, device="cpu", runtime=FakeRuntime(), device_info=ADA, **kw))
    pipe = HybridStitchPipeline.from_engines(trt_folder)
    assert pipe.backend == "tensorrt"
    cfg = StitchConfig(mask_ratios=(0.3, 0.1), thresholds=(float("inf"), 1e9, 1e8), name="all-stages")
    got, want = _run(pipe, cfg), _run(tiny_pipe, cfg)
    assert got.trace.backend == "tensorrt"
    kinds = [s.stage_kind for s in got.trace.steps]
    assert kinds == ["large", "large", "masked", "masked", "small", "small", "small", "small"]
    assert kinds == [s.stage_kind for s in want.trace.steps]
    assert rel(got.images, want.images) < 1e-5
    with pytest.raises(HybridStitchError, match="ONNX Runtime settings"):
        HybridStitchPipeline.from_engines(trt_folder, backend="tensorrt", num_threads=1)
    with pytest.raises(HybridStitchError, match="holds tensorrt engines"):  # ONNX Runtime settings: ONNX Runtime
        HybridStitchPipeline.from_engines(trt_folder, num_threads=1)


@pytest.mark.parametrize(
    "device,match",
    [
        (A100, "compute capability 8.0"),
        (SimpleNamespace(name="NVIDIA RTX 6000 Ada Generation", compute_capability=(8, 9), tensorrt_version="10.8.0.43",
                         describe=lambda: "RTX 6000 Ada, TensorRT 10.8.0.43"), "TensorRT 10.8.0.43"),
    ],
)
def test_engines_of_another_gpu_or_tensorrt_are_refused_untouched(trt_folder, device, match):
    before = snapshot(trt_folder)
    with pytest.raises(HybridStitchError, match=match) as e:
        load(trt_folder, device_info=device)
    assert "hybridstitch-export --backend tensorrt" in str(e.value) and trt_folder in str(e.value)
    assert snapshot(trt_folder) == before


def test_attention_and_compiler_choice(trt_folder):
    with pytest.raises(HybridStitchError, match="attention plugin, not standard"):
        load(trt_folder, attention="standard")
    with pytest.raises(HybridStitchError, match="compiler onnx, not torch-tensorrt"):
        load(trt_folder, compiler="torch-tensorrt")


def test_damaged_engine_is_refused(trt_folder, tmp_path):
    work = str(tmp_path / "eng")
    shutil.copytree(trt_folder, work)
    record = read_manifest(work).tensorrt["builds"][f"{ADA_TARGET}/trt{TRT_VERSION}/onnx-plugin"]["engines"]["large"]
    path = os.path.join(work, record["file"])
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(HybridStitchError, match="large engine .* corrupted"):
        load(work)
    os.unlink(path)
    with pytest.raises(HybridStitchError, match="missing. Rerun hybridstitch-export"):
        load(work, verify_files=False)


def test_engine_built_from_an_earlier_graph_is_refused(trt_folder, tmp_path):
    work = str(tmp_path / "eng")
    shutil.copytree(trt_folder, work)
    with open(os.path.join(work, "manifest.json")) as f:
        raw = json.load(f)
    raw["graphs"]["small"]["files"][0]["sha256"] = "0" * 64  # the graph was re-exported, the engine was not
    with open(os.path.join(work, "manifest.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(HybridStitchError, match="built from an earlier small graph; rerun hybridstitch-export"):
        load(work)


def test_engine_io_that_differs_from_the_manifest_is_named(trt_folder):
    def half_latents(where, tensors):
        if not where.endswith("small.plan"):
            return tensors
        return [EngineTensor(t.name, t.is_input, t.shape, "float16" if t.name == "latents" else t.dtype) for t in tensors]

    with pytest.raises(HybridStitchError, match="small engine's input 'latents' is float16"):
        load(trt_folder, runtime=FakeRuntime(tamper=half_latents))


def test_backends_refuse_each_others_folders(trt_folder, tiny_engines):
    from hybridstitch.engine.onnxruntime_backend import load_engines as load_ort

    with pytest.raises(HybridStitchError, match="holds tensorrt engines"):
        load_ort(trt_folder)
    with pytest.raises(HybridStitchError, match="holds onnxruntime engines"):
        load(tiny_engines[0])


def test_a_folder_without_builds_says_how_to_build(trt_folder, tmp_path):
    work = str(tmp_path / "eng")
    shutil.copytree(trt_folder, work)
    with open(os.path.join(work, "manifest.json")) as f:
        raw = json.load(f)
    raw["tensorrt"] = None
    with open(os.path.join(work, "manifest.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(HybridStitchError, match="no TensorRT engines.*hybridstitch-export --backend tensorrt"):
        load(work)


# -- on a GPU with TensorRT -------------------------------------------------------------------------------------


def _real_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT >= 10.8 is not installed (GPU machines only: pip install hybridstitch[gpu])")
    pytest.importorskip("polygraphy", reason="Polygraphy is not installed (pip install polygraphy)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_real_engines_match_torch_on_gpu(tiny_dirs, tmp_path, cuda_graphs):
    """Real fp16 TensorRT engines of the tiny pair (plugin path), with and without CUDA graphs."""
    _real_tensorrt()
    from hybridstitch.engine.torch_backend import TorchDenoiser
    from hybridstitch.export import ExportRequest, export_engines
    from hybridstitch.loading import load_transformer

    out = str(tmp_path / "trt")
    export_engines(ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], height=64, width=64, batch=2, buckets=(0.3,),
                                 text_tokens=7, precision="fp16", backend="tensorrt"), out, progress=False)
    es = load_engines(out, cuda_graphs=cuda_graphs)
    large = TorchDenoiser(load_transformer(tiny_dirs[0], "large").cuda(), "large")
    x, pe, pooled, t = (v.cuda() for v in inputs(seed=7))
    cache, ref = es.large.new_cache(2, 8, 8), large.new_cache(2, 8, 8)
    for _ in range(3):  # each (engine, cache set) pair is captured on first use, replayed on the third step
        assert rel(es.large.forward(x, pe, pooled, t, cache=cache), large.forward(x, pe, pooled, t, cache=ref)) < 2e-2
        idx = select_mask(torch.rand(2, 16, device="cuda"), 5)
        assert rel(es.large.forward_masked(x, pe, pooled, t, idx, cache), large.forward_masked(x, pe, pooled, t, idx, ref)) < 2e-2
    if cuda_graphs:
        assert any(p.graphs for p in es.large.engine.profiles) or es.notes  # captured, or the fallback said why
