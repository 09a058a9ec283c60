"""The ONNX Runtime backend against the torch backend, and its refusals.

Relative error throughout: ``max|a - b| / max|b|`` with ``b`` the torch result.
"""

import hashlib
import json
import os
import shutil

import pytest
import torch

from hybridstitch import HybridStitchError, HybridStitchPipeline, StitchConfig
from hybridstitch.denoiser import MaskedDenoiser
from hybridstitch.engine.manifest import sealed
from hybridstitch.engine.onnxruntime_backend import load_engines, resolve_providers, session_options
from hybridstitch.engine.torch_backend import TorchDenoiser
from hybridstitch.loading import load_transformer
from tests.conftest import JOINT_DIM, text_inputs
from tests.engine.parity import assert_caches_match, assert_masked_parity, inputs, rel

STEPS = 8


def snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (os.stat(p).st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


@pytest.fixture(scope="module")
def engines(tiny_engines):
    return load_engines(tiny_engines[0], num_threads=1)


@pytest.fixture(scope="module")
def torch_pair(tiny_dirs):
    return (TorchDenoiser(load_transformer(tiny_dirs[0], "large"), "large"),
            TorchDenoiser(load_transformer(tiny_dirs[1], "small"), "small"))


def test_denoisers_behind_the_interface(engines, torch_pair):
    large, small = torch_pair
    assert isinstance(engines.large, MaskedDenoiser)
    assert engines.large.backend == engines.small.backend == "onnxruntime"
    assert engines.large.spec == large.spec and engines.small.spec == small.spec
    assert engines.providers == ["CPUExecutionProvider"] and engines.device == torch.device("cpu")
    for g in [engines.large.graph, engines.small.graph]:
        assert g.session.get_session_options().intra_op_num_threads == 1


def test_full_forwards_match_torch(engines, torch_pair):
    large, small = torch_pair
    x, pe, pooled, t = inputs()
    assert rel(engines.small.forward(x, pe, pooled, t), small.forward(x, pe, pooled, t)) < 1e-5
    got, caches = engines.large.forward_store(x, pe, pooled, t)
    want, ref = large.forward_store(x, pe, pooled, t)
    assert rel(got, want) < 1e-5
    assert rel(engines.large.forward(x, pe, pooled, t), large.forward(x, pe, pooled, t)) < 1e-5  # no cache kept
    assert_caches_match(caches, ref)


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_masked_forward_fresh_and_stale_cache_match_torch(engines, torch_pair, ratio):
    assert_masked_parity(engines, torch_pair[0], ratio)


def test_caches_belong_to_the_caller_and_only_masked_rows_change(engines):
    """The graph reads the caller's caches by pointer and writes the updated ones into new tensors:
    the inputs stay as they were, and only the masked positions differ in the outputs."""
    x, pe, pooled, t = inputs(seed=3)
    _, caches = engines.large.forward_store(x, pe, pooled, t)
    assert len(caches) == 8 and all(isinstance(c, torch.Tensor) for c in caches.values())  # 4 slots x K, V
    before = {n: c.clone() for n, c in caches.items()}
    idx = torch.tensor([[0, 3], [5, 9]])
    _, after = engines.large.forward_masked(x + 1.0, pe, pooled, t, idx, caches)
    assert all(torch.equal(caches[n], before[n]) for n in caches)  # inputs untouched
    assert all(after[n].data_ptr() != caches[n].data_ptr() for n in caches)
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[0, [0, 3]] = keep[1, [5, 9]] = False
    for name in before:
        for b in range(2):
            assert torch.equal(after[name][b][:, keep[b]], before[name][b][:, keep[b]])
            assert not torch.allclose(after[name][b][:, ~keep[b]], before[name][b][:, ~keep[b]])


def test_any_ratio_runs_exactly_its_token_count(engines):
    """One graph takes any k: a ratio gets exactly ceil(r * N) tokens, no bucket rounds it up."""
    large = engines.large
    for ratio, k in ((0.1, 2), (0.2, 4), (0.3, 5), (0.05, 1), (0.5, 8), (1.0, 16)):
        b = large.bucket_for(ratio, 16)
        assert (b.masked_tokens, b.ratio, b.graph) == (k, ratio, "large")
    large.validate_request(2, 8, 8, mask_ratios=(0.9,))  # no bucket needed


def _run(pipe, config, height=64, width=64, num_images_per_prompt=1):
    emb = text_inputs(1)
    shape = (num_images_per_prompt, 16, height // 8, width // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return pipe(config=config, num_inference_steps=STEPS, guidance_scale=4.5, height=height, width=width,
                latents=latents, num_images_per_prompt=num_images_per_prompt, output_type="latent", progress=False, **emb)


@pytest.fixture(scope="module")
def ort_pipe(tiny_engines):
    return HybridStitchPipeline.from_engines(tiny_engines[0], num_threads=1)


def test_whole_run_matches_torch(ort_pipe, tiny_pipe):
    cfg = StitchConfig(mask_ratios=(0.3, 0.1), thresholds=(float("inf"), 1e9, 1e8), name="all-stages")
    got, want = _run(ort_pipe, cfg), _run(tiny_pipe, cfg)
    assert got.trace.backend == "onnxruntime" and want.trace.backend == "torch"
    kinds = [s.stage_kind for s in got.trace.steps]
    assert kinds == ["large", "large", "masked", "masked", "small", "small", "small", "small"]
    assert kinds == [s.stage_kind for s in want.trace.steps]
    assert got.trace.switch_steps == want.trace.switch_steps == [2, 3, 4]
    assert [s.masked_tokens for s in got.trace.steps] == [s.masked_tokens for s in want.trace.steps]
    for a, b in zip(got.trace.steps[1:], want.trace.steps[1:]):
        assert abs(a.d - b.d) <= 1e-5 * abs(b.d)
    assert rel(got.images, want.images) < 1e-5


def test_a_ratio_of_no_bucket_runs_exactly(ort_pipe, tiny_pipe):
    # 0.2 is no export bucket: ONNX Runtime still runs exactly 4 tokens, as torch does
    cfg = StitchConfig(mask_ratios=(0.2,), thresholds=(float("inf"), 0.0))
    got, want = _run(ort_pipe, cfg), _run(tiny_pipe, cfg)
    masked = [s for s in got.trace.steps if s.stage_kind == "masked"]
    assert masked and all(s.mask_ratio == 0.2 and s.bucket_ratio == 0.2 and s.masked_tokens == 4 for s in masked)
    assert rel(got.images, want.images) < 1e-5


def test_engines_serve_any_batch(ort_pipe, tiny_pipe):
    """The graphs' batch is symbolic: two images per prompt (batch 4 with CFG) run on the same engines."""
    got, want = _run(ort_pipe, "hybridstitch-30", num_images_per_prompt=2), _run(tiny_pipe, "hybridstitch-30",
                                                                                  num_images_per_prompt=2)
    assert got.images.shape[0] == 2
    assert [t.switch_steps for t in got.traces] == [t.switch_steps for t in want.traces]
    assert rel(got.images, want.images) < 1e-5


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(height=128, width=128), "built for 64x64"),
    ],
)
def test_requests_the_engines_cannot_serve_fail_before_any_work(ort_pipe, monkeypatch, kw, match):
    calls = []
    for g in [ort_pipe.large.graph, ort_pipe.small.graph]:
        monkeypatch.setattr(g, "run", lambda *a, **k: calls.append(1))
    config = kw.pop("config", "hybridstitch-30")
    with pytest.raises(HybridStitchError, match=match):
        _run(ort_pipe, config, **kw)
    assert calls == []


def test_text_tokens_mismatch_is_named(engines):
    x, pe, pooled, t = inputs()
    with pytest.raises(HybridStitchError, match="prompt_embeds.*--text-tokens 9"):
        engines.small.forward(x, torch.randn(2, 9, JOINT_DIM), pooled, t)


# -- engine folders that must be refused, untouched -------------------------------------------------


def _edit_manifest(folder, fn, reseal=True):
    """Edit the manifest as a writer would (``reseal``: with its checksum updated), or by hand."""
    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        raw = json.load(f)
    fn(raw)
    with open(path, "w") as f:
        json.dump(sealed(raw) if reseal else raw, f)


def _truncate(folder):
    with open(os.path.join(folder, "large.onnx"), "r+b") as f:
        f.truncate(2000)


def _corrupt(folder):
    path = os.path.join(folder, "large.onnx")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(
    "damage,match",
    [
        (_truncate, r"large.onnx is \d+ bytes.*truncated"),
        (_corrupt, "large.onnx is corrupted"),
        (lambda d: _edit_manifest(d, lambda m: m.update(format_version=99)), "format version 99"),
        (lambda d: _edit_manifest(d, lambda m: m.update(format="other")), "not a hybridstitch engine manifest"),
        (lambda d: _edit_manifest(d, lambda m: m.update(complete=False)), "did not finish"),
        (lambda d: _edit_manifest(d, lambda m: m["backend"].update(name="tensorrt")), "holds tensorrt engines"),
        (lambda d: _edit_manifest(d, lambda m: m["scheduler"].update(shift=1.0), reseal=False), "changed after export"),
        (lambda d: _edit_manifest(d, lambda m: m["graphs"]["large"].update(file="/tmp/x.onnx")),
         r"graphs.large.file: Value error, must be a plain file name"),
        (lambda d: _edit_manifest(d, lambda m: m["graphs"]["large"].update(files=[])),
         r"graphs.large.files: List should have at least 1 item"),
        (lambda d: _edit_manifest(d, lambda m: m["resolution"].pop("vae_scale_factor")),
         r"resolution.vae_scale_factor: Field required"),
        (lambda d: os.unlink(os.path.join(d, "manifest.json")), "no manifest.json"),
        (lambda d: open(os.path.join(d, "manifest.json"), "w").write("{not json"), "could not read"),
    ],
)
def test_damaged_engine_folders_are_refused_untouched(tiny_engines, tmp_path, damage, match):
    work = str(tmp_path / "eng")
    shutil.copytree(tiny_engines[0], work)
    damage(work)
    before = snapshot(work)
    with pytest.raises(HybridStitchError, match=match):
        HybridStitchPipeline.from_engines(work, num_threads=1)
    assert snapshot(work) == before


def test_corrupted_engine_without_hash_check_is_still_a_clear_error(tiny_engines, tmp_path):
    work = str(tmp_path / "eng")
    shutil.copytree(tiny_engines[0], work)
    path = os.path.join(work, "small.onnx")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # same size, garbage header: only the parser can tell
        f.write(b"\xff" * 64)
    assert os.path.getsize(path) == size
    with pytest.raises(HybridStitchError, match="could not load the small engine"):
        load_engines(work, num_threads=1, verify_files=False)


def test_weights_changed_since_export_are_refused(tiny_engines, tiny_dirs, tmp_path):
    work, ckpt = str(tmp_path / "eng"), str(tmp_path / "small")
    shutil.copytree(tiny_engines[0], work)
    shutil.copytree(tiny_dirs[1], ckpt)

    def point_at_copy(m):
        m["models"]["small"]["path"] = ckpt
        m["models"]["small"]["transformer_dir"] = os.path.join(ckpt, "transformer")

    _edit_manifest(work, point_at_copy)
    load_engines(work, num_threads=1)  # a copy with other mtimes but the same bytes passes
    weights = os.path.join(ckpt, "transformer", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:  # same size, other bytes
        f.seek(os.path.getsize(weights) - 8)
        f.write(b"\x01" * 8)
    before = snapshot(work)
    with pytest.raises(HybridStitchError, match="small weights .* changed since these engines were exported"):
        HybridStitchPipeline.from_engines(work, num_threads=1)
    assert snapshot(work) == before
    load_engines(work, num_threads=1, check_weights=False)  # as exported, on request


def test_provider_choice():
    import onnxruntime as ort

    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(HybridStitchError, match="onnxruntime-gpu"):
            resolve_providers(["cuda"])
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(HybridStitchError, match="onnxruntime-gpu"):
            resolve_providers("tensorrt")
    with pytest.raises(HybridStitchError, match="num_threads"):
        session_options(0)


def test_fp16_engines(tiny_dirs, torch_pair, tmp_path):
    """fp16 engines take and return the caller's float32 tensors; the error is fp16's, not a bug's."""
    from hybridstitch.export import ExportRequest, export_engines

    out = str(tmp_path / "fp16")
    export_engines(ExportRequest(large=tiny_dirs[0], small=tiny_dirs[1], height=64, width=64, batch=2, buckets=(0.3,),
                                 text_tokens=7, precision="fp16"), out, progress=False)
    es = load_engines(out, num_threads=1)
    assert es.manifest.graphs["large"].inputs[0].dtype == "float16"
    large, small = torch_pair
    x, pe, pooled, t = inputs(seed=4)
    v = es.small.forward(x, pe, pooled, t)
    assert v.dtype == torch.float32 and rel(v, small.forward(x, pe, pooled, t)) < 1e-2
    got, caches = es.large.forward_store(x, pe, pooled, t)
    want, ref = large.forward_store(x, pe, pooled, t)
    assert rel(got, want) < 1e-2
    idx = torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]])
    assert rel(es.large.forward_masked(x, pe, pooled, t, idx, caches)[0], large.forward_masked(x, pe, pooled, t, idx, ref)[0]) < 1e-2


def test_steady_masked_steps_alternate_two_cache_sets_and_hold_one_spare(tiny_engines, tiny_pipe):
    """The memory plan counts two cache sets per request (the one read, the one written): a run of
    masked steps writes into the set the previous step replaced, holds at most one spare, and gives
    the images a fresh run gives."""
    pipe = HybridStitchPipeline.from_engines(tiny_engines[0], num_threads=1)
    large = pipe.large
    written = []
    new_caches = large._new_caches

    def recording(sizes):
        out = new_caches(sizes)
        written.append(next(iter(out.values())).data_ptr())
        assert len(large._free) <= 1
        return out

    large._new_caches = recording
    cfg = StitchConfig(mask_ratios=(0.3,), thresholds=(float("inf"), 0.0))  # 2 large steps, then masked to the end
    got = _run(pipe, cfg)
    masked_writes = written[2:]  # after the two full steps
    assert len(masked_writes) == STEPS - 2 and len(set(masked_writes)) <= 2
    assert len(large._free) <= 1
    assert rel(got.images, _run(tiny_pipe, cfg).images) < 1e-5
