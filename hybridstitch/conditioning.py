"""Prompt encoding and latent decoding: the parts the large and small models share.

SD3.5 Large and SD3 Medium share their text encoders and VAE, so one conditioner (loaded from
the large folder) serves both transformers. A conditioner has ``encode(prompt, negative_prompt,
do_cfg, device) -> Conditioning``, ``decode(latents) -> PIL images``, ``to(device)`` and
``vae_scale_factor``. :class:`SD3Conditioner` runs a diffusers SD3 pipeline folder (CLIP-L,
CLIP-G, T5, VAE) through diffusers' own ``StableDiffusion3Pipeline.encode_prompt`` and VAE decode;
other kinds (the testbed's, :mod:`hybridstitch.testbed.conditioner`) live with their models and
are found by :func:`hybridstitch.loading.load_conditioner`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .errors import HybridStitchError


@dataclass
class Conditioning:
    """Text inputs of one request, already CFG-batched when guidance is on: [uncond..., cond...]."""

    prompt_embeds: torch.Tensor  # [B or 2B, T, joint_attention_dim]
    pooled: torch.Tensor  # [B or 2B, pooled_projection_dim]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, C, H, W] in [-1, 1] -> PIL images (RGB for 3 channels, L for 1)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    x = x.permute(0, 2, 3, 1).numpy()  # [B, H, W, C]
    if x.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in x]
    return [Image.fromarray(a) for a in x]


class SD3Conditioner:
    """Text encoders and VAE of a diffusers SD3 pipeline folder."""

    kind = "sd3"

    def __init__(self, sd3_pipeline):
        self.pipe = sd3_pipeline
        self.vae_scale_factor = 2 ** (len(sd3_pipeline.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, folder: str, torch_dtype=None) -> "SD3Conditioner":
        from diffusers import StableDiffusion3Pipeline

        # transformer=None: the transformers are loaded (and owned) by the denoisers.
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, transformer=None, torch_dtype=torch_dtype)
        return cls(pipe)

    def to(self, device) -> "SD3Conditioner":
        self.pipe.to(device)
        return self

    def encode(self, prompt: list[str], negative_prompt: list[str], do_cfg: bool, device) -> Conditioning:
        pe, npe, ppe, nppe = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_cfg,
            device=device,
        )
        if do_cfg:
            return Conditioning(torch.cat([npe, pe]), torch.cat([nppe, ppe]))
        return Conditioning(pe, ppe)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return to_pil(images)


def no_conditioner_error() -> HybridStitchError:
    return HybridStitchError(
        "these checkpoints hold transformers only (no text encoders or VAE in the large folder's "
        "model_index.json): pass prompt_embeds and pooled_prompt_embeds (and the negative ones when "
        "guidance_scale > 1) and output_type='latent', or point `large` at a full diffusers SD3 pipeline folder"
    )
