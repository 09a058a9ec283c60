"""Prompt encoding and latent decoding: the parts the large and small models share.

SD3.5 Large and SD3 Medium share their text encoders and VAE, so one conditioner (loaded from
the large folder) serves both transformers. A conditioner has ``encode(prompt, negative_prompt,
do_cfg, device) -> Conditioning``, ``decode(latents) -> PIL images``, ``to(device)`` and
``vae_scale_factor``. :class:`SD3Conditioner` runs a diffusers SD3 pipeline folder (CLIP-L,
CLIP-G, T5, VAE) through diffusers' own ``StableDiffusion3Pipeline.encode_prompt`` and VAE decode;
other kinds (the testbed's, :mod:`hybridstitch.testbed.conditioner`) live with their models and
are found by :func:`hybridstitch.loading.load_conditioner`.

The text encoders are 11.2 GB in fp16 (T5-XXL alone 9.5 GB), so :class:`EncoderOptions` says
where they run -- with the transformers, on the CPU, or not at all (``prompt_embeds`` only) --
and whether T5 is loaded, dropped (diffusers pads its tokens with zeros) or passed in already
loaded (e.g. quantized to 8 bits).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .errors import HybridStitchError

PLACEMENTS = ("device", "cpu", "none")


@dataclass(frozen=True)
class EncoderOptions:
    """Where the text encoders run, and which T5.

    ``placement``: ``"device"`` (with the transformers), ``"cpu"`` (text encoders on the CPU, the
    VAE with the transformers; the embeddings are moved to the transformers' device), ``"none"``
    (no text encoders loaded: pass ``prompt_embeds``). ``text_encoder_3``: ``"load"`` (from the
    folder), ``"none"`` (no T5; SD3 pipelines accept that and pad its tokens with zeros), or a
    loaded ``torch.nn.Module`` (e.g. T5 in 8 bits), which is used where it is and never moved.
    """

    placement: str = "device"
    text_encoder_3: Any = "load"

    def __post_init__(self) -> None:
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            raise HybridStitchError(
                f"encoders must be one of {', '.join(map(repr, PLACEMENTS))} (with the transformers, on the CPU, or not "
                f"loaded), got {self.placement!r}"
            )
        t5 = self.text_encoder_3
        if not (isinstance(t5, torch.nn.Module) or isinstance(t5, str) and t5 in ("load", "none")):
            raise HybridStitchError(
                f"text_encoder_3 must be 'load', 'none' (drop T5) or a loaded T5 encoder module, got {t5!r}"
            )
        if self.placement == "none" and not (isinstance(t5, str) and t5 == "load"):
            raise HybridStitchError("encoders='none' loads no text encoder; leave text_encoder_3 at its default")

    @property
    def loads_t5(self) -> bool:
        return isinstance(self.text_encoder_3, str) and self.text_encoder_3 == "load"

    def text_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu") if self.placement == "cpu" else torch.device(device)


def place_conditioner(conditioner, device: torch.device, options: EncoderOptions) -> None:
    """Text encoders on ``options.text_device(device)``, the VAE on ``device``. Conditioners
    without a ``place`` method move as one piece with their text encoders."""
    place = getattr(conditioner, "place", None)
    if place is not None:
        place(options.text_device(device), torch.device(device))
    else:
        conditioner.to(options.text_device(device))


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


@functools.lru_cache(maxsize=None)
def _encoder_pipeline_class():
    """diffusers' SD3 pipeline, holding no transformer (the denoisers own the transformers).

    With T5 dropped, diffusers pads T5's tokens with zeros as wide as the transformer's
    ``joint_attention_dim``, which it reads from ``self.transformer``; this subclass takes the
    width as an attribute instead, and is otherwise diffusers' own encode_prompt.
    """
    from diffusers import StableDiffusion3Pipeline

    class EncoderOnlySD3Pipeline(StableDiffusion3Pipeline):
        t5_padding_width: int | None = None

        def _get_t5_prompt_embeds(self, prompt=None, num_images_per_prompt=1, max_sequence_length=256, device=None,
                                  dtype=None):
            if self.text_encoder_3 is None and self.transformer is None:
                batch = 1 if isinstance(prompt, str) else len(prompt)
                return torch.zeros((batch * num_images_per_prompt, max_sequence_length, self.t5_padding_width),
                                   device=device or self._execution_device, dtype=dtype or self.text_encoder.dtype)
            return super()._get_t5_prompt_embeds(prompt, num_images_per_prompt, max_sequence_length, device, dtype)

    return EncoderOnlySD3Pipeline


class SD3Conditioner:
    """Text encoders and VAE of a diffusers SD3 pipeline folder."""

    kind = "sd3"

    def __init__(self, sd3_pipeline, options: EncoderOptions | None = None):
        self.pipe = sd3_pipeline
        self.options = options or EncoderOptions()
        self.vae_scale_factor = 2 ** (len(sd3_pipeline.vae.config.block_out_channels) - 1)
        self.text_device = torch.device("cpu")

    @classmethod
    def from_pretrained(cls, folder: str, torch_dtype=None, options: EncoderOptions | None = None,
                        joint_attention_dim: int | None = None) -> "SD3Conditioner":
        from .loading import dtype_kwarg

        options = options or EncoderOptions()
        # transformer=None: the transformers are loaded (and owned) by the denoisers.
        parts: dict[str, Any] = dict(transformer=None)
        if options.placement == "none":
            parts.update({name: None for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                                   "text_encoder_3", "tokenizer_3")})
        elif options.text_encoder_3 == "none":
            if joint_attention_dim is None:
                raise HybridStitchError("dropping T5 needs the transformer's joint_attention_dim (the padding width)")
            parts.update(text_encoder_3=None, tokenizer_3=None)
        elif not options.loads_t5:
            parts.update(text_encoder_3=options.text_encoder_3)
        pipe = _encoder_pipeline_class().from_pretrained(folder, local_files_only=True, **dtype_kwarg(torch_dtype), **parts)
        pipe.t5_padding_width = joint_attention_dim
        return cls(pipe, options)

    @property
    def has_text_encoders(self) -> bool:
        return self.pipe.text_encoder is not None

    def place(self, text_device: torch.device, vae_device: torch.device) -> "SD3Conditioner":
        """CLIP-L/G (and T5 when loaded from the folder) on ``text_device``, the VAE on ``vae_device``.
        A T5 module passed in stays where it is, and must be on ``text_device`` already."""
        self.text_device = text_device
        for name in ("text_encoder", "text_encoder_2") + (("text_encoder_3",) if self.options.loads_t5 else ()):
            module = getattr(self.pipe, name)
            if module is not None:
                module.to(text_device)
        t5 = self.pipe.text_encoder_3
        if t5 is not None and not self.options.loads_t5:
            where = next(t5.parameters()).device
            if where.type != text_device.type:
                raise HybridStitchError(
                    f"the text_encoder_3 passed in is on {where}, the other text encoders run on {text_device}; "
                    f"load it there (encoders='cpu' runs the text encoders on the CPU)"
                )
        self.pipe.vae.to(vae_device)
        return self

    def to(self, device) -> "SD3Conditioner":
        return self.place(torch.device(device), torch.device(device))

    def encode(self, prompt: list[str], negative_prompt: list[str], do_cfg: bool, device=None) -> Conditioning:
        """Embeddings on the text encoders' device (the caller moves them to the transformers')."""
        if not self.has_text_encoders:
            raise HybridStitchError("this pipeline was loaded with encoders='none'; pass prompt_embeds")
        pe, npe, ppe, nppe = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_cfg,
            device=self.text_device,
        )
        if do_cfg:
            return Conditioning(torch.cat([npe, pe]), torch.cat([nppe, ppe]))
        return Conditioning(pe, ppe)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        return to_pil(images)


def no_conditioner_error() -> HybridStitchError:
    return HybridStitchError(
        "these checkpoints hold transformers only (no text encoders or VAE in the large folder's "
        "model_index.json): pass prompt_embeds and pooled_prompt_embeds (and the negative ones when "
        "guidance_scale > 1) and output_type='latent', or point `large` at a full diffusers SD3 pipeline folder"
    )
