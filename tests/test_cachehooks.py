"""diffusers' own cache hooks on the pair's transformers (hybridstitch.cachehooks): real hooks, real models."""

import pytest
import torch

from hybridstitch import HybridStitchError, StitchConfig
from hybridstitch.cachehooks import CacheHook, HookedMethod, attach, hooked_pipeline, method, shared_copy
from tests.test_batch_invariance import assert_invariant, needs_weights, testbed_torch  # noqa: F401 (fixture)
from tests.test_pipeline import run


def hooked(pipe, kind, preset="large", **options):
    return hooked_pipeline(pipe, HookedMethod(f"test-{kind}", preset, (CacheHook(kind, options=tuple(options.items())),), ""))


@pytest.mark.parametrize("kind, options", [
    ("taylorseer", dict(disable_cache_before_step=100, taylor_factors_dtype=torch.float32)),  # warm-up never ends
    ("pab", dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-2, -1))),  # no timestep in range
    ("fastercache", dict(spatial_attention_timestep_skip_range=(-2, -1), unconditional_batch_timestep_skip_range=(-2, -1))),
])
def test_a_hook_that_never_skips_reproduces_the_large_model_exactly(tiny_pipe, kind, options):
    ref, _, _ = run(tiny_pipe, "large")
    out, _, _ = run(hooked(tiny_pipe, kind, **options), "large")
    assert torch.equal(out.images, ref.images)


@pytest.mark.parametrize("name", ["taylorseer", "taylorseer-blocks", "pab", "fastercache"])
def test_hooks_act_reset_between_calls_and_leave_the_plain_pipeline_alone(tiny_pipe, name):
    ref, _, _ = run(tiny_pipe, "large")
    pipe = hooked_pipeline(tiny_pipe, name)
    first, _, _ = run(pipe, "large", batch=2)
    second, _, _ = run(pipe, "large", batch=2)
    assert torch.equal(first.images, second.images)  # the second call starts from reset hooks
    assert not torch.allclose(first.images[:1], ref.images, rtol=1e-6, atol=1e-6)  # the hook changed something
    assert pipe.denoisers[0].calls == 8  # one hooked call per step
    again, _, _ = run(tiny_pipe, "large")
    assert torch.equal(again.images, ref.images)  # shared weights, untouched modules


def test_fastercache_rows_are_reordered_per_image(tiny_pipe):
    """FasterCache splits a batch as [uncond..., cond...]; the pipeline's rows are [uncond, cond] per image.
    With the reordering, an image is the same alone or beside another (without it, halves would mix images)."""
    pipe = hooked_pipeline(tiny_pipe, "fastercache")
    both, latents, _ = run(pipe, "large", batch=2)
    from tests.conftest import text_inputs

    embeds = text_inputs(2)
    alone = pipe(config="large", num_inference_steps=8, guidance_scale=4.5, height=64, width=64, latents=latents[1:],
                 output_type="latent", progress=False, **{k: v[1:] for k, v in embeds.items()})
    torch.testing.assert_close(both.images[1:], alone.images, rtol=1e-5, atol=1e-5)


def test_fastercache_needs_pooled_projections_split_on_sd3(tiny_pipe):
    """diffusers' default batch-split inputs lack SD3's pooled_projections: the skipped-uncond call crashes
    (two images; with one, the two pooled rows broadcast over the one conditional row instead)."""
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    model = shared_copy(tiny_pipe.large.model)
    apply_faster_cache(model, FasterCacheConfig(current_timestep_callback=lambda: 500, tensor_format="BCHW",
                                                attention_weight_callback=lambda _: 0.5))
    x, pe, pp = torch.randn(4, 16, 8, 8), torch.randn(4, 7, 32), torch.randn(4, 16)
    model(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pp, timestep=torch.full((4,), 500.0))
    with pytest.raises(RuntimeError, match="size of tensor"):
        model(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pp, timestep=torch.full((4,), 500.0))


def test_first_block_cache_fails_on_sd3s_last_block(tiny_pipe):
    """Verified against the installed diffusers; if this starts passing, FirstBlockCache can join the benchmarks."""
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.models.cache_utils import CacheMixin

    model = shared_copy(tiny_pipe.large.model)
    attach(model, CacheHook("firstblock", options=(("threshold", 0.1),)), lambda: 500.0)
    assert isinstance(FirstBlockCacheConfig(), object)
    with pytest.raises(TypeError, match="NoneType"), CacheMixin.cache_context(model, "run"):
        model(hidden_states=torch.randn(2, 16, 8, 8), encoder_hidden_states=torch.randn(2, 7, 32),
              pooled_projections=torch.randn(2, 16), timestep=torch.full((2,), 500.0))
    with pytest.raises(HybridStitchError, match="first_block_cache.py:176"):
        hooked_pipeline(tiny_pipe, "firstblock")


def test_bad_hook_requests_say_how_to_fix(tiny_pipe):
    with pytest.raises(HybridStitchError, match="choose one of"):
        CacheHook("teacache")
    with pytest.raises(HybridStitchError, match="taylorseer or firstblock"):
        CacheHook("pab", model="small", stage="small")
    with pytest.raises(HybridStitchError, match="method 'large' only"):
        hooked(tiny_pipe, "taylorseer", preset="hybridstitch-30")
    with pytest.raises(HybridStitchError, match="unknown cached method"):
        method("nope")
    bound = hooked_pipeline(tiny_pipe, method("hybridstitch-30+taylorseer"))
    with pytest.raises(HybridStitchError, match="forward_samples"):
        bound.denoisers[0].forward(torch.randn(2, 16, 8, 8), torch.randn(2, 7, 32), torch.randn(2, 16),
                                   torch.full((2,), 500.0))


def test_the_combination_only_touches_small_only_steps(tiny_pipe):
    cfg = StitchConfig(mask_ratios=(0.3,), thresholds=(1e9, 1e8), name="stitched")  # large, large, masked, small...
    plain, _, _ = run(tiny_pipe, cfg)
    combo = hooked_pipeline(tiny_pipe, method("hybridstitch-30+taylorseer"))
    out, _, _ = run(combo, cfg)
    assert [s.stage_kind for s in out.trace.steps] == ["large", "large", "masked"] + ["small"] * 5
    assert combo.denoisers[0].calls == 5  # one hooked call per small-only step, none in the masked stage
    assert not torch.equal(out.images, plain.images)


@needs_weights
def test_the_combination_keeps_images_independent_of_their_batch(testbed_torch):  # noqa: F811
    """Images enter the small-only stage at different steps; each cohort has its own hook state, so an image
    is the same alone or in a batch, and the batch really has several cohorts."""
    pipe = hooked_pipeline(testbed_torch, method("testbed-10+taylorseer"))
    schedules = assert_invariant(pipe, "testbed-10")
    assert len({s[-1] for s in schedules}) >= 2, schedules
