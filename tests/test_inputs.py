"""Bad input to ``HybridStitchPipeline.__call__``, tried as a careless or hostile user would
(issue 15, points 5 and 9): each ends in a HybridStitchError that says what to pass, before any
work; the awkward-but-valid ones (NumPy integers, per-image generators) run and match a reference."""

import re

import numpy as np
import pytest
import torch

from hybridstitch import HybridStitchError, HybridStitchPipeline
from hybridstitch.testbed import LARGE_DIR, SMALL_DIR
from tests.conftest import JOINT_DIM, POOLED_DIM, text_inputs

H = W = 64
LATENT = dict(output_type="latent", progress=False, height=H, width=W, num_inference_steps=2)


@pytest.fixture(scope="module")
def testbed():
    return HybridStitchPipeline.from_pretrained(large=LARGE_DIR, small=SMALL_DIR)


def refused(pipe, fragment, **kw):
    with pytest.raises(HybridStitchError) as e:
        pipe(**kw)
    assert fragment in str(e.value), str(e.value)
    return str(e.value)


# -- point 5: non-finite numbers ----------------------------------------------------------------


@pytest.mark.parametrize("g", [float("inf"), -float("inf"), float("nan"), np.float64("nan")])
def test_non_finite_guidance_is_refused(tiny_pipe, g):
    refused(tiny_pipe, "guidance_scale must be a finite number", guidance_scale=g, **LATENT, **text_inputs(1))


@pytest.mark.parametrize("name", ["prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                                  "negative_pooled_prompt_embeds"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused(tiny_pipe, name, value):
    emb = text_inputs(1)
    emb[name] = emb[name].clone()
    emb[name].view(-1)[3] = value
    refused(tiny_pipe, f"{name} holds 1 NaN or infinite value(s)", guidance_scale=4.5, **LATENT, **emb)


def test_non_finite_latents_are_refused(tiny_pipe):
    latents = torch.randn(1, 16, 8, 8)
    latents[0, 3, 2, 2] = -float("inf")
    refused(tiny_pipe, "latents holds 1 NaN or infinite value(s)", latents=latents, guidance_scale=4.5, **LATENT,
            **text_inputs(1))


def test_a_run_whose_latents_overflow_stops_with_the_step_and_stage(tiny_pipe):
    # A finite but absurd guidance scale overflows float32 in the first guided step.
    msg = refused(tiny_pipe, "latents became NaN or infinite after step",
                  config="large", guidance_scale=1e38, **LATENT, **text_inputs(1))
    assert re.search(r"after step \d+ \(large stage\), sample\(s\) \[0\]", msg) and "float16 overflow" in msg


def test_guidance_scale_runs_from_numpy_and_ints(tiny_pipe):
    kw = dict(config="large", generator=torch.Generator().manual_seed(0), **LATENT, **text_inputs(1))
    ref = tiny_pipe(guidance_scale=4.0, **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(tiny_pipe(guidance_scale=np.int64(4), **kw).images, ref)


# -- point 9: argument types ----------------------------------------------------------------------


@pytest.mark.parametrize("kw, fragment", [
    (dict(height=32.0), "height must be an integer, got 32.0 (float)"),
    (dict(height="64"), "height must be an integer, got '64' (str)"),
    (dict(width=0), "width must be an integer >= 1, got 0"),
    (dict(height=-64), "height must be an integer >= 1, got -64"),
    (dict(num_inference_steps=True), "num_inference_steps must be an integer, got the bool True"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
    (dict(num_inference_steps=2**70), "num_inference_steps must be an integer in [1, 1000]"),
    (dict(num_images_per_prompt=1.5), "num_images_per_prompt must be an integer"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1"),
    (dict(generator=42), "generator must be a torch.Generator (e.g. torch.Generator().manual_seed(42))"),
    (dict(generator=[torch.Generator(), torch.Generator()]), "got 2 generators for 1 image(s)"),
    (dict(guidance_scale="7"), "guidance_scale must be a real number, got '7' (str)"),
    (dict(output_type="pt"), "output_type must be 'pil' or 'latent'"),
    (dict(progress="no"), "progress must be True or False"),
    (dict(negative_prompt="a dog"), "negative_prompt is text and goes with `prompt`"),
])
def test_wrong_argument_types_are_refused(tiny_pipe, kw, fragment):
    refused(tiny_pipe, fragment, **{**LATENT, "guidance_scale": 4.5, **text_inputs(1), **kw})


def test_numpy_and_malformed_embeddings_are_refused(tiny_pipe):
    emb = text_inputs(1)
    as_numpy = {**emb, "prompt_embeds": emb["prompt_embeds"].numpy()}
    refused(tiny_pipe, "prompt_embeds is a NumPy array; pass a torch tensor (torch.from_numpy(prompt_embeds))",
            guidance_scale=4.5, **LATENT, **as_numpy)
    refused(tiny_pipe, "latents is a NumPy array", latents=np.zeros((1, 16, 8, 8), np.float32), guidance_scale=4.5,
            **LATENT, **emb)
    refused(tiny_pipe, "prompt_embeds must have 3 dimensions", prompt_embeds=torch.zeros(7, JOINT_DIM),
            pooled_prompt_embeds=torch.zeros(1, POOLED_DIM), guidance_scale=1.0, **LATENT)
    refused(tiny_pipe, "prompt_embeds must be [batch >= 1, tokens >= 1", prompt_embeds=torch.zeros(1, 0, JOINT_DIM),
            pooled_prompt_embeds=torch.zeros(1, POOLED_DIM), guidance_scale=1.0, **LATENT)
    refused(tiny_pipe, "floating-point tensor", prompt_embeds=torch.zeros(1, 7, JOINT_DIM, dtype=torch.long),
            pooled_prompt_embeds=torch.zeros(1, POOLED_DIM), guidance_scale=1.0, **LATENT)


def test_prompt_types_are_refused(testbed):
    kw = dict(output_type="latent", progress=False, num_inference_steps=2)
    refused(testbed, "prompt must be a string or a list of strings, got int", prompt=3, **kw)
    refused(testbed, "prompt is an empty list", prompt=[], **kw)
    refused(testbed, "prompt[1] must be a string, got None", prompt=["a handwritten 1", None], **kw)
    refused(testbed, "negative_prompt must be a string or a list of strings", prompt="a handwritten 1",
            negative_prompt=3, **kw)
    refused(testbed, "negative_prompt_embeds go with prompt_embeds", prompt="a handwritten 1",
            negative_prompt_embeds=torch.zeros(1, 8, 64), **kw)


def test_numpy_integers_run_as_ints(tiny_pipe):
    kw = dict(config="hybridstitch-30", guidance_scale=4.5, output_type="latent", progress=False, **text_inputs(1))
    ref = tiny_pipe(num_inference_steps=3, height=H, width=W, generator=torch.Generator().manual_seed(1), **kw)
    got = tiny_pipe(num_inference_steps=np.int64(3), height=np.int32(H), width=np.int64(W),
                    num_images_per_prompt=np.int8(1), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(got.images, ref.images) and len(got.trace.steps) == 3


def test_none_height_means_the_default_size(testbed):
    out = testbed(prompt="a handwritten 2", height=None, width=None, num_inference_steps=2, output_type="latent",
                  progress=False)
    assert out.images.shape[-2:] == (32, 32)


def test_one_generator_per_image_gives_each_image_its_own_noise(testbed):
    """A list of generators (as diffusers takes): image i is the one a single-image call with
    generator i makes (large-only, so batch-mates cannot change the schedule)."""
    prompts = ["a handwritten 1", "a handwritten 7"]
    kw = dict(config="large", num_inference_steps=3, output_type="latent", progress=False, guidance_scale=1.25)
    both = testbed(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in (5, 9)], **kw).images
    for i, (p, s) in enumerate(zip(prompts, (5, 9))):
        alone = testbed(prompt=p, generator=torch.Generator().manual_seed(s), **kw).images
        torch.testing.assert_close(both[i:i + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_generator_draws_the_noise_diffusers_draws(tiny_dirs):
    pipe = HybridStitchPipeline.from_pretrained(large=tiny_dirs[0], small=tiny_dirs[1], device="cuda")
    out = pipe(config="large", generator=torch.Generator("cuda").manual_seed(0), guidance_scale=4.5, **LATENT,
               **text_inputs(1))
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator("cuda").manual_seed(0), device="cuda")
    ref = pipe(config="large", latents=noise, guidance_scale=4.5, **LATENT, **text_inputs(1))
    assert torch.equal(out.images, ref.images)
