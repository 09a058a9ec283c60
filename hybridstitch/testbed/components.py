"""The testbed's stand-ins for SD3's text encoders and VAE.

SD3.5 Large and SD3 Medium share their text encoders and VAE; only the transformers
differ. The testbed keeps that shape: one :class:`TestbedPromptEncoder` (trained with the
large transformer, then frozen while the small one trains) and one :class:`IdentityVAE`
(pixel space is the latent space) serve both transformers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hybridstitch.errors import HybridStitchError

NULL_PROMPT = ""

# "a handwritten 3", "a handwritten digit 3", "digit 3" or "3"; case and spacing are free.
_PROMPT_RE = re.compile(r"^(?:a\s+handwritten\s+(?:digit\s+)?|handwritten\s+|digit\s+)?([0-9])$")


def parse_prompt(prompt: str, num_classes: int = 10) -> int | None:
    """The class id of ``prompt``: 0..9 for a digit, ``None`` for the null prompt ``""``.

    Raises :class:`HybridStitchError` for anything else, listing what is accepted.
    """
    if not isinstance(prompt, str):
        raise HybridStitchError(
            f"prompts must be strings, got {type(prompt).__name__} ({prompt!r}); "
            "use e.g. 'a handwritten 3'"
        )
    text = " ".join(prompt.strip().lower().split())
    if text == NULL_PROMPT:
        return None
    match = _PROMPT_RE.match(text)
    if match is None or int(match.group(1)) >= num_classes:
        raise HybridStitchError(
            f"the testbed prompt encoder does not understand {prompt!r}. It knows the digits "
            f"0..{num_classes - 1}: write 'a handwritten N', 'a handwritten digit N', 'digit N' "
            "or just 'N' (e.g. 'a handwritten 3'); the empty string '' is the null prompt used "
            "as the negative prompt for classifier-free guidance"
        )
    return int(match.group(1))


class TestbedPromptEncoder(ModelMixin, ConfigMixin):
    """Maps a digit prompt to learned text tokens and a pooled vector.

    Stands in for SD3's CLIP + T5 stack: ``encode`` returns ``prompt_embeds``
    ``[B, num_tokens, joint_attention_dim]`` and ``pooled_prompt_embeds``
    ``[B, pooled_projection_dim]``, the two conditioning inputs of
    ``SD3Transformer2DModel``. Each class (the ten digits and the null prompt) owns one
    learned token sequence and one learned pooled vector.
    """

    __test__ = False  # not a pytest test class despite the name

    @register_to_config
    def __init__(
        self,
        num_classes: int = 10,
        num_tokens: int = 8,
        joint_attention_dim: int = 64,
        pooled_projection_dim: int = 64,
    ):
        super().__init__()
        # Row num_classes is the null prompt "".
        self.tokens = nn.Embedding(num_classes + 1, num_tokens * joint_attention_dim)
        self.pooled = nn.Embedding(num_classes + 1, pooled_projection_dim)
        nn.init.normal_(self.tokens.weight, std=1.0)
        nn.init.normal_(self.pooled.weight, std=1.0)

    @property
    def null_id(self) -> int:
        return self.config.num_classes

    def prompt_ids(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Class ids ``[B]`` (int64) of ``prompts``; the null prompt maps to ``null_id``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = []
        for prompt in prompts:
            label = parse_prompt(prompt, self.config.num_classes)
            ids.append(self.null_id if label is None else label)
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of class ids ``[B]`` (``null_id`` for the null prompt)."""
        b = ids.shape[0]
        cfg = self.config
        prompt_embeds = self.tokens(ids).view(b, cfg.num_tokens, cfg.joint_attention_dim)  # [B, T, D]
        pooled = self.pooled(ids)  # [B, P]
        return prompt_embeds, pooled

    def encode(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [B, T, joint_attention_dim], pooled [B, pooled_projection_dim])``."""
        return self(self.prompt_ids(prompts))


class IdentityVAE(ModelMixin, ConfigMixin):
    """The testbed's VAE: pixel space is the latent space.

    Follows the parts of ``AutoencoderKL``'s interface that an SD3 pipeline uses:
    ``config.scaling_factor`` / ``config.shift_factor`` (1 and 0, so the usual
    ``latents / scaling_factor + shift_factor`` is a no-op), ``config.block_out_channels``
    (one entry, so ``vae_scale_factor = 2 ** (len - 1) = 1``), and
    ``decode(latents, return_dict=True)`` returning a ``DecoderOutput`` whose ``sample`` is
    the image clamped to ``[-1, 1]`` (``return_dict=False`` gives a one-element tuple).
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 1,
        sample_size: int = 32,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        block_out_channels: tuple[int, ...] = (1,),
    ):
        super().__init__()
        # No weights; an empty non-persistent buffer gives the module a dtype and device
        # (ModelMixin.dtype looks for a parameter or buffer) and keeps the saved file empty.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As ``ModelMixin.save_pretrained``, plus an empty weights file.

        With no tensors to save, diffusers writes only ``config.json``, and
        ``from_pretrained`` then refuses the folder for lacking a weights file; an empty
        safetensors file makes the folder loadable like any other component.
        """
        import os

        from safetensors.torch import save_file

        super().save_pretrained(save_directory, *args, **kwargs)
        weights = os.path.join(save_directory, "diffusion_pytorch_model.safetensors")
        if not os.path.exists(weights):
            save_file({}, weights)

    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` to latents (the identity)."""
        return images.to(self.dtype)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        images = latents.clamp(-1.0, 1.0)  # [B, C, H, W]
        if not return_dict:
            return (images,)
        # Imported here, not at the top: diffusers' autoencoders package imports transformers,
        # whose docstring processing fails under `python -OO`; the pipeline asks for the tuple.
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=images)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents, return_dict=False)[0]
