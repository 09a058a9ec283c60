"""Loading complete diffusers SD3 pipeline folders (text encoders + VAE), against diffusers itself."""

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from hybridstitch import HybridStitchPipeline


def test_full_folder_large_preset_equals_diffusers_sd3_pipeline(tiny_sd3_dirs):
    large, small = tiny_sd3_dirs
    pipe = HybridStitchPipeline.from_pretrained(large=large, small=small)
    assert pipe.conditioner.kind == "sd3" and pipe.vae_scale_factor == 8
    kw = dict(prompt="a cat", negative_prompt="a dog", num_inference_steps=3, guidance_scale=4.5, height=64, width=64)
    ours = pipe(config="large", generator=torch.Generator().manual_seed(0), progress=False, **kw)
    ref_pipe = StableDiffusion3Pipeline.from_pretrained(large)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert ours.images[0].size == (64, 64)
    # same latents and the same VAE decode; PIL rounding may differ by one level
    diff = np.abs(np.asarray(ours.images[0], dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    assert diff.max() <= 1


def test_full_folder_hybridstitch_runs_with_prompts(tiny_sd3_dirs):
    large, small = tiny_sd3_dirs
    pipe = HybridStitchPipeline.from_pretrained(large=large, small=small)
    out = pipe(prompt=["a cat", "a dog"], config="hybridstitch-30", num_inference_steps=4, height=64, width=64,
               generator=torch.Generator().manual_seed(0), progress=False)
    assert len(out.images) == 2 and [t.batch for t in out.traces] == [2, 2]
