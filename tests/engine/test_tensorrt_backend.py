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
from hybridstitch.engine.tensorrt_backend import load_engines
from hybridstitch.engine.builds import EngineTensor, TensorRTOptions
from hybridstitch.engine.manifest import read_manifest, sealed
from hybridstitch.export.onnx_steps import DenoiserFromCheckpoint
from hybridstitch.export.tensorrt_build import build_engines
from hybridstitch.masks import select_mask
from tests.engine.parity import assert_caches_match, assert_masked_parity, inputs, rel
from tests.engine.test_onnxruntime_backend import _run, snapshot, torch_pair  # noqa: F401
from tests.tensorrt_fakes import A100, ADA, TRT_VERSION, FakeRuntime, FakeToolchain

ADA_TARGET = "sm89-nvidia-rtx-6000-ada-generation"


def make_tensorrt_folder(ort_folder: str, dst: str, tiny_dirs, toolchain=None, batch: int | None = None,
                         **options) -> dict:
    """A copy of the ONNX Runtime export turned into a TensorRT export with fake engines
    (the graphs are the same; only the manifest's backend, its batch and the engines differ)."""
    shutil.copytree(ort_folder, dst)
    manifest = read_manifest(dst)
    manifest.backend = {"name": "tensorrt", "version": TRT_VERSION}
    if batch is not None:
        manifest.batch = batch
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


def test_one_large_engine_with_a_profile_per_batch_and_bucket_on_one_memory_block(engines):
    """One large engine (one copy of the weights): a static profile per (batch, bucket k) plus k = N for
    the full step, one user-managed context each; every context of both engines shares one block."""
    large, small = engines.large.engine, engines.small.engine
    assert large.profile_sizes == [{"batch": b, "k": k} for b in (1, 2) for k in (2, 5, 16)]
    assert small.profile_sizes == [{"batch": 1}, {"batch": 2}]
    contexts = [p.context for p in [*large.profiles, *small.profiles]]
    assert [c.profile for c in contexts] == [0, 1, 2, 3, 4, 5, 0, 1] and all(c.user_managed for c in contexts)
    assert len({c.device_memory for c in contexts}) == 1  # one block ...
    assert engines.memory.size == max(large.memory_need(), small.memory_need())  # ... sized to the largest


def test_full_forwards_match_torch(engines, torch_pair):
    large, small = torch_pair
    x, pe, pooled, t = inputs()
    assert rel(engines.small.forward(x, pe, pooled, t), small.forward(x, pe, pooled, t)) < 1e-5
    got, caches = engines.large.forward_store(x, pe, pooled, t)
    want, ref = large.forward_store(x, pe, pooled, t)
    assert rel(got, want) < 1e-5
    assert_caches_match(caches, ref)
    assert rel(engines.large.forward(x, pe, pooled, t), want) < 1e-5
    # one row: the batch-1 profiles
    assert rel(engines.small.forward(x[:1], pe[:1], pooled[:1], t[:1]), small.forward(x[:1], pe[:1], pooled[:1], t[:1])) < 1e-5


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_masked_forward_fresh_and_stale_cache_match_torch(engines, torch_pair, ratio):
    assert_masked_parity(engines, torch_pair[0], ratio)


def test_buffers_are_made_once_per_profile_and_caches_bound_by_address(engines):
    """Inputs and outputs live in buffers made once per profile; the caller's caches are bound as they
    are, and the updated caches are new tensors (only the masked rows differ)."""
    x, pe, pooled, t = inputs(seed=3)
    large = engines.large
    full_profile = next(p for p in large.engine.profiles if p.sizes == {"batch": 2, "k": 16})
    masked_profile = next(p for p in large.engine.profiles if p.sizes == {"batch": 2, "k": 2})
    _, caches = large.forward_store(x, pe, pooled, t)
    full_buffers = {n: v.data_ptr() for buffers in full_profile.buffers.values() for n, v in buffers.items()}
    context = full_profile.context
    assert context.shapes["index"] == (2, 16) and context.addresses["latents"] == full_buffers["latents"]
    assert context.addresses["new_cache_k.0.attn"] == caches["cache_k.0.attn"].data_ptr()
    before = {n: c.clone() for n, c in caches.items()}
    idx = torch.tensor([[0, 3], [5, 9]])
    _, after = large.forward_masked(x + 1.0, pe, pooled, t, idx, caches)
    masked_context = masked_profile.context
    assert masked_context.shapes["index"] == (2, 2)
    assert masked_context.addresses["cache_k.0.attn"] == caches["cache_k.0.attn"].data_ptr()
    assert masked_context.addresses["new_cache_k.0.attn"] == after["cache_k.0.attn"].data_ptr()
    assert all(torch.equal(caches[n], before[n]) for n in caches)  # the inputs are not modified
    large.forward_store(x, pe, pooled, t)  # the full profile's buffers are made once
    assert {n: v.data_ptr() for buffers in full_profile.buffers.values() for n, v in buffers.items()} == full_buffers
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[0, [0, 3]] = keep[1, [5, 9]] = False
    for name in before:
        for b in range(2):
            assert torch.equal(after[name][b][:, keep[b]], before[name][b][:, keep[b]])
            assert not torch.allclose(after[name][b][:, ~keep[b]], before[name][b][:, ~keep[b]])


def test_a_batch_without_a_profile_runs_padded_and_a_too_large_one_is_refused(trt_folder, torch_pair, tmp_path,
                                                                             tiny_engines, tiny_dirs):
    work = str(tmp_path / "b4")
    make_tensorrt_folder(tiny_engines[0], work, tiny_dirs, batch=4)  # profiles at batch 1, 2, 4
    es = load(work)
    x, pe, pooled, t = inputs(batch=3, seed=9)  # 3 rows: run in the batch-4 profile, the padding dropped
    assert rel(es.small.forward(x, pe, pooled, t), torch_pair[1].forward(x, pe, pooled, t)) < 1e-5
    got, caches = es.large.forward_store(x, pe, pooled, t)
    assert got.shape[0] == 3 and all(c.shape[0] == 3 for c in caches.values())
    with pytest.raises(HybridStitchError, match="profiles up to batch 4"):
        es.small.validate_request(6, 8, 8)


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
        json.dump(sealed(raw), f)
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
        json.dump(sealed(raw), f)
    with pytest.raises(HybridStitchError, match="no TensorRT engines.*hybridstitch-export --backend tensorrt"):
        load(work)


# -- on a GPU with TensorRT -------------------------------------------------------------------------------------


def _real_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT 10.9-11.x is not installed (GPU machines only: pip install hybridstitch[gpu])")
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
    for _ in range(3):  # each (profile, cache addresses) pair is captured on first use, replayed later
        got, caches = es.large.forward_store(x, pe, pooled, t)
        want, ref = large.forward_store(x, pe, pooled, t)
        assert rel(got, want) < 2e-2
        idx = select_mask(torch.rand(2, 16, device="cuda"), 5)
        assert rel(es.large.forward_masked(x, pe, pooled, t, idx, caches)[0],
                   large.forward_masked(x, pe, pooled, t, idx, ref)[0]) < 2e-2
    if cuda_graphs:
        assert any(p.graphs for p in es.large.engine.profiles) or es.notes  # captured, or the fallback said why
