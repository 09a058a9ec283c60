"""The testbed's conditioner: its learned prompt encoder and identity "VAE".

Found by :func:`hybridstitch.loading.load_conditioner` through the folder's
``model_index.json`` (``_class_name: HybridStitchTestbedPipeline``), by import path, so the
method package never imports the testbed.
"""

from __future__ import annotations

import os

import torch
from PIL import Image

from hybridstitch.conditioning import Conditioning, to_pil


class TestbedConditioner:
    """The shipped testbed's prompt encoder and identity VAE (pixel space stands in for latents)."""

    kind = "testbed"
    __test__ = False  # not a pytest class

    def __init__(self, prompt_encoder, vae):
        self.prompt_encoder = prompt_encoder.eval()
        self.vae = vae
        self.vae_scale_factor = 1

    @classmethod
    def from_pretrained(cls, folder: str, torch_dtype=None) -> "TestbedConditioner":
        from .components import IdentityVAE, TestbedPromptEncoder

        enc = TestbedPromptEncoder.from_pretrained(os.path.join(folder, "prompt_encoder"))
        vae = IdentityVAE.from_pretrained(os.path.join(folder, "vae"))
        if torch_dtype is not None:
            enc = enc.to(torch_dtype)
        return cls(enc, vae)

    def to(self, device) -> "TestbedConditioner":
        self.prompt_encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompt: list[str], negative_prompt: list[str], do_cfg: bool, device) -> Conditioning:
        pe, ppe = self.prompt_encoder.encode(prompt)
        if do_cfg:
            npe, nppe = self.prompt_encoder.encode(negative_prompt)
            pe, ppe = torch.cat([npe, pe]), torch.cat([nppe, ppe])
        return Conditioning(pe.to(device), ppe.to(device))

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        cfg = self.vae.config
        latents = latents / cfg.scaling_factor + cfg.shift_factor
        return to_pil(self.vae.decode(latents, return_dict=False)[0])


def load_conditioner(folder: str, index: dict, torch_dtype=None) -> TestbedConditioner | None:
    """The conditioner of a testbed folder; None for a transformer-only one (the small model's)."""
    if "prompt_encoder" not in index:
        return None
    return TestbedConditioner.from_pretrained(folder, torch_dtype=torch_dtype)
