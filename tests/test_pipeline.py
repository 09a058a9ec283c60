"""The pipeline end to end on tiny checkpoints loaded through from_pretrained."""

import json
import os
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from hybridstitch import HybridStitchError, HybridStitchPipeline, StitchConfig
from tests.conftest import text_inputs, tiny_transformer, write_checkpoint

H = W = 64  # latent 8x8 -> 16 tokens: fast on CPU
STEPS = 8


def euler_reference(model, steps, guidance, latents, embeds):
    """Plain diffusers-style sampling with one model (the SD3 pipeline's loop, restated)."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    pe = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    ppe = torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]])
    x = latents
    with torch.no_grad():
        for t in sched.timesteps:
            inp = torch.cat([x, x])
            v = model(hidden_states=inp, encoder_hidden_states=pe, pooled_projections=ppe,
                      timestep=t.expand(inp.shape[0]), return_dict=False)[0]
            u, c = v.chunk(2)
            v = u + guidance * (c - u)
            x = sched.step(v, t, x, return_dict=False)[0]
    return x


def run(pipe, config, batch=1, steps=STEPS, seed=0, **kw):
    embeds = text_inputs(batch)
    latents = torch.randn(batch, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))
    out = pipe(config=config, num_inference_steps=steps, guidance_scale=4.5, height=H, width=W,
               latents=latents, output_type="latent", progress=False, **embeds, **kw)
    return out, latents, embeds


@pytest.mark.parametrize("which", ["large", "small"])
def test_single_model_presets_equal_plain_euler(tiny_pipe, which):
    out, latents, embeds = run(tiny_pipe, which)
    model = (tiny_pipe.large if which == "large" else tiny_pipe.small).model
    ref = euler_reference(model, STEPS, 4.5, latents, embeds)
    assert torch.equal(out.images, ref)
    assert {s.stage_kind for s in out.trace.steps} == {which}


def test_thresholds_that_never_fire_reproduce_large_exactly(tiny_pipe):
    never = StitchConfig(mask_ratios=(0.3,), thresholds=(1e-30, 0.0))
    out, _, _ = run(tiny_pipe, never)
    ref, _, _ = run(tiny_pipe, "large")
    assert torch.equal(out.images, ref.images)
    assert out.trace.switch_steps == []


def test_masked_stage_with_ratio_one_reproduces_large(tiny_pipe):
    # tau_1 = inf fires on the first difference: masked from step 2, never leaves (tau_2 = 0)
    full_mask = StitchConfig(mask_ratios=(1.0,), thresholds=(float("inf"), 0.0))
    out, _, _ = run(tiny_pipe, full_mask)
    ref, _, _ = run(tiny_pipe, "large")
    kinds = [s.stage_kind for s in out.trace.steps]
    assert kinds == ["large", "large"] + ["masked"] * (STEPS - 2)
    assert all(s.masked_tokens == 16 for s in out.trace.steps if s.stage_kind == "masked")
    torch.testing.assert_close(out.images, ref.images, rtol=1e-4, atol=1e-4)


def test_hybridstitch_runs_all_stages_and_traces(tiny_pipe, tmp_path):
    cfg = StitchConfig(mask_ratios=(0.3, 0.1), thresholds=(float("inf"), 1e9, 1e8), name="all-stages")
    out, _, _ = run(tiny_pipe, cfg, batch=2)
    assert len(out.traces) == 2 and [t.sample for t in out.traces] == [0, 1]  # one trace per image
    for trace in out.traces:
        kinds = [s.stage_kind for s in trace.steps]
        assert kinds == ["large", "large", "masked", "masked", "small", "small", "small", "small"]
        assert trace.switch_steps == [2, 3, 4]
        masked = [s for s in trace.steps if s.stage_kind == "masked"]
        assert [s.masked_tokens for s in masked] == [5, 2]  # ceil(0.3*16), ceil(0.1*16)
        assert set(masked[0].seconds) == {"small", "large_masked"}
        assert trace.steps[0].d is None and all(s.d is not None for s in trace.steps[1:])
    path = tmp_path / "trace.json"
    out.traces[1].save(path)
    data = json.loads(path.read_text())
    assert data["switch_steps"] == [2, 3, 4] and len(data["steps"]) == STEPS and data["sample"] == 1
    assert out.images.shape == (2, 16, 8, 8)
    with pytest.raises(HybridStitchError, match="made 2 images"):
        out.trace


def test_static_and_fulllarge_ablations_run(tiny_pipe):
    for name in ("hybridstitch-30-static", "hybridstitch-30-fulllarge"):
        cfg = StitchConfig.preset(name).replace(thresholds=(float("inf"), 0.0))
        out, _, _ = run(tiny_pipe, cfg)
        assert "masked" in {s.stage_kind for s in out.trace.steps}
        if name.endswith("fulllarge"):
            assert "large_masked" not in out.trace.steps[-1].seconds and "large" in out.trace.steps[-1].seconds


def test_fulllarge_at_ratio_one_equals_large(tiny_pipe):
    cfg = StitchConfig(mask_ratios=(1.0,), thresholds=(float("inf"), 0.0), stage2_large="full")
    out, _, _ = run(tiny_pipe, cfg)
    ref, _, _ = run(tiny_pipe, "large")
    assert torch.equal(out.images, ref.images)


def test_calls_do_not_leak_state(tiny_pipe):
    cfg = StitchConfig(mask_ratios=(0.3,), thresholds=(float("inf"), 0.0))
    a, _, _ = run(tiny_pipe, cfg)
    # another request at another resolution and step count in between
    tiny_pipe(config=cfg, num_inference_steps=5, guidance_scale=4.5, height=128, width=96, output_type="latent",
              progress=False, generator=torch.Generator().manual_seed(1), **text_inputs(1))
    b, _, _ = run(tiny_pipe, cfg)
    assert torch.equal(a.images, b.images)


def test_generator_reproducible(tiny_pipe):
    kw = dict(config="hybridstitch-30", num_inference_steps=4, guidance_scale=4.5, height=H, width=W,
              output_type="latent", progress=False, **text_inputs(1))
    a = tiny_pipe(generator=torch.Generator().manual_seed(3), **kw).images
    b = tiny_pipe(generator=torch.Generator().manual_seed(3), **kw).images
    assert torch.equal(a, b)


# -- bad input ------------------------------------------------------------------------------


def expect_error(fragment, fn):
    with pytest.raises(HybridStitchError) as e:
        fn()
    assert fragment in str(e.value), str(e.value)


def test_size_errors(tiny_pipe):
    kw = dict(output_type="latent", progress=False, num_inference_steps=2, **text_inputs(1))
    expect_error("multiples of 16", lambda: tiny_pipe(height=72, width=64, **kw))
    expect_error("at most 256", lambda: tiny_pipe(height=288, width=64, **kw))


def test_input_errors(tiny_pipe):
    emb = text_inputs(1)
    expect_error("exactly one of `prompt`", lambda: tiny_pipe(output_type="latent", height=H, width=W))
    expect_error("transformers only", lambda: tiny_pipe(prompt="a cat", height=H, width=W))
    expect_error("negative_prompt_embeds", lambda: tiny_pipe(
        prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=emb["pooled_prompt_embeds"],
        output_type="latent", height=H, width=W))
    expect_error("unknown preset", lambda: tiny_pipe(config="fast", output_type="latent", height=H, width=W, **emb))
    expect_error("num_inference_steps", lambda: tiny_pipe(num_inference_steps=0, output_type="latent", height=H, width=W, **emb))
    expect_error("prompt_embeds must be", lambda: tiny_pipe(
        prompt_embeds=torch.zeros(1, 7, 5), pooled_prompt_embeds=torch.zeros(1, 16), guidance_scale=1.0,
        output_type="latent", height=H, width=W))


def test_mismatched_pair_is_refused(tmp_path, tiny_dirs):
    other = write_checkpoint(str(tmp_path / "small4"), tiny_transformer("small", 2, in_channels=4, out_channels=4))
    expect_error("latent channels", lambda: HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=other))
    other = write_checkpoint(str(tmp_path / "smallp1"), tiny_transformer("small", 2, patch_size=1))
    expect_error("patch size", lambda: HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=other))


def test_missing_and_unreadable_folders(tmp_path, tiny_dirs):
    expect_error("does not exist", lambda: HybridStitchPipeline.from_pretrained(large=str(tmp_path / "nope"), small=tiny_dirs[1]))
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error("no transformer found", lambda: HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=str(empty)))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs[1], broken)
    (broken / "transformer" / "config.json").write_text("{not json")
    expect_error("could not read", lambda: HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=str(broken)))
    noweights = tmp_path / "noweights"
    shutil.copytree(tiny_dirs[1], noweights)
    for f in os.listdir(noweights / "transformer"):
        if f.endswith(".safetensors"):
            (noweights / "transformer" / f).write_bytes(b"\0" * 10)
    expect_error("could not load the small transformer", lambda: HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=str(noweights)))


def test_transformer_folder_directly(tiny_dirs):
    pipe = HybridStitchPipeline.from_pretrained(large=os.path.join(tiny_dirs[0], "transformer"), small=tiny_dirs[1])
    assert pipe.large.spec.qk_norm == "rms_norm" and pipe.large.spec.dual_attention_layers == (0,)


def test_torch_dtype_is_applied(tiny_dirs):
    pipe = HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=tiny_dirs[1], torch_dtype=torch.bfloat16)
    assert pipe.large.dtype == torch.bfloat16 and pipe.small.dtype == torch.bfloat16
    out = pipe(config=StitchConfig(mask_ratios=(0.3,), thresholds=(float("inf"), 0.0)), num_inference_steps=3,
               guidance_scale=4.5, height=H, width=W, output_type="latent", progress=False,
               generator=torch.Generator().manual_seed(0), **text_inputs(1))
    assert out.images.dtype == torch.bfloat16 and torch.isfinite(out.images.float()).all()
