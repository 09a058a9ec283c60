"""The torch denoiser as functional graphs with fixed input/output names, ready for export.

Three kinds of graph (one resolution and batch each; the batch counts the CFG doubling):

==================  =================================================  ==============================================
graph               inputs                                             outputs
==================  =================================================  ==============================================
``small``           latents, prompt_embeds, pooled, timestep           velocity
``large``           latents, prompt_embeds, pooled, timestep           velocity, cache_k.{slot}, cache_v.{slot} ...
``large_masked_*``  latents, index, prompt_embeds, pooled, timestep,   tokens, new_cache_k.{slot},
                    cache_k.{slot}, cache_v.{slot} ...                 new_cache_v.{slot} ...
==================  =================================================  ==============================================

Shapes: latents [B, C, H, W]; prompt_embeds [B, T, joint_attention_dim]; pooled
[B, pooled_projection_dim]; timestep [B] float32 (sigma * 1000); index [B, k] int64; velocity
[B, C_out, H, W]; tokens [B, k, p*p*C_out]; every cache [B, heads, N, head_dim].

A slot is one attention with an image-token cache, named ``{layer}.{attn|attn2}`` (``attn2``
for the dual-attention blocks of SD3.5 Medium), in the order of
:attr:`TransformerSpec.attention_slots`. The full large graph's cache outputs carry exactly
the names of the masked graphs' cache inputs, so a runtime binds one to the other by name;
one tensor per slot (not one stacked tensor) keeps each cache write a single contiguous
buffer and lets TensorRT alias each one in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridstitch.denoiser import TransformerSpec
from hybridstitch.engine.torch_backend import (
    TorchDenoiser,
    TorchKVCache,
    _StitchContext,
    masked_transformer_forward,
)

FULL_INPUTS = ("latents", "prompt_embeds", "pooled", "timestep")
MASKED_INPUTS = ("latents", "index", "prompt_embeds", "pooled", "timestep")


def slot_name(slot: tuple[int, str]) -> str:
    """``(3, "attn")`` -> ``"3.attn"``."""
    return f"{slot[0]}.{slot[1]}"


def cache_names(spec: TransformerSpec, prefix: str = "") -> list[str]:
    """``[prefix + "cache_k.0.attn", prefix + "cache_v.0.attn", ...]``: K then V, slot by slot."""
    names = []
    for slot in spec.attention_slots:
        names += [f"{prefix}cache_k.{slot_name(slot)}", f"{prefix}cache_v.{slot_name(slot)}"]
    return names


@dataclass(frozen=True)
class GraphShapes:
    """The fixed shapes of one export: batch (CFG included), latent size, text tokens."""

    batch: int
    latent_height: int
    latent_width: int
    text_tokens: int

    def image_tokens(self, spec: TransformerSpec) -> int:
        p = spec.patch_size
        return (self.latent_height // p) * (self.latent_width // p)


def io_shapes(kind: str, spec: TransformerSpec, shapes: GraphShapes, masked_tokens: int | None = None):
    """(inputs, outputs) of a graph: lists of ``(name, shape, dtype)`` with dtype ``"float"``
    (the engine precision), ``"float32"`` or ``"int64"``."""
    b, h, w, t = shapes.batch, shapes.latent_height, shapes.latent_width, shapes.text_tokens
    n = shapes.image_tokens(spec)
    p = spec.patch_size
    cache_shape = [b, spec.num_heads, n, spec.head_dim]
    text = [
        ("prompt_embeds", [b, t, spec.joint_attention_dim], "float"),
        ("pooled", [b, spec.pooled_projection_dim], "float"),
        ("timestep", [b], "float32"),
    ]
    latents = ("latents", [b, spec.in_channels, h, w], "float")
    velocity = ("velocity", [b, spec.out_channels, h, w], "float")
    caches = [(name, cache_shape, "float") for name in cache_names(spec)]
    if kind == "small":
        return [latents, *text], [velocity]
    if kind == "large":
        return [latents, *text], [velocity, *caches]
    if kind == "masked":
        assert masked_tokens is not None
        k = masked_tokens
        inputs = [latents, ("index", [b, k], "int64"), *text, *caches]
        outputs = [("tokens", [b, k, p * p * spec.out_channels], "float")]
        outputs += [(name, cache_shape, "float") for name in cache_names(spec, "new_")]
        return inputs, outputs
    raise ValueError(f"unknown graph kind {kind!r}")


class FullGraph(nn.Module):
    """The whole transformer: (latents, prompt_embeds, pooled, timestep) -> velocity [B, C, H, W]."""

    def __init__(self, denoiser: TorchDenoiser):
        super().__init__()
        self.model = denoiser.model

    def forward(self, latents, prompt_embeds, pooled, timestep):
        return self.model(
            hidden_states=latents, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
            timestep=timestep, return_dict=False,
        )[0]


class FullLargeGraph(nn.Module):
    """The whole large transformer, also returning every slot's image K/V (after qk-norm):
    -> (velocity, cache_k.{slot0}, cache_v.{slot0}, cache_k.{slot1}, ...)."""

    def __init__(self, denoiser: TorchDenoiser):
        super().__init__()
        self.model = denoiser.model
        self.slots = denoiser.spec.attention_slots

    def forward(self, latents, prompt_embeds, pooled, timestep):
        cache = TorchKVCache(batch=latents.shape[0], num_tokens=0)
        velocity = self.model(
            hidden_states=latents, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
            timestep=timestep, joint_attention_kwargs={"stitch": _StitchContext("store", cache)}, return_dict=False,
        )[0]
        outputs = [velocity]
        for slot in self.slots:
            outputs += list(cache.layers[slot])  # K, V: [B, H, N, D]
        return tuple(outputs)


class MaskedLargeGraph(nn.Module):
    """The large transformer on the masked image tokens + all text tokens, over the caches:
    (latents, index, prompt_embeds, pooled, timestep, *caches) -> (tokens [B, k, p*p*C], *new caches)."""

    def __init__(self, denoiser: TorchDenoiser):
        super().__init__()
        self.model = denoiser.model
        self.slots = denoiser.spec.attention_slots

    def forward(self, latents, index, prompt_embeds, pooled, timestep, *caches):
        assert len(caches) == 2 * len(self.slots)
        cache = TorchKVCache(batch=latents.shape[0], num_tokens=caches[0].shape[2], filled=True)
        for i, slot in enumerate(self.slots):
            cache.layers[slot] = (caches[2 * i], caches[2 * i + 1])
        tokens = masked_transformer_forward(self.model, latents, prompt_embeds, pooled, timestep, index, cache)
        outputs = [tokens]
        for slot in self.slots:
            outputs += list(cache.layers[slot])
        return tuple(outputs)


def example_inputs(
    kind: str, spec: TransformerSpec, shapes: GraphShapes, dtype: torch.dtype, masked_tokens: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs of a graph's exact shapes (for tracing and for checks); indices sorted, distinct."""
    inputs, _ = io_shapes(kind, spec, shapes, masked_tokens)
    g = torch.Generator().manual_seed(seed)
    n = shapes.image_tokens(spec)
    out = []
    for name, shape, kind_dtype in inputs:
        if name == "index":
            rows = [torch.sort(torch.randperm(n, generator=g)[: shape[1]]).values for _ in range(shape[0])]
            out.append(torch.stack(rows))
        elif name == "timestep":
            out.append(torch.rand(shape, generator=g) * 1000.0)
        else:
            out.append(torch.randn(shape, generator=g).to(dtype if kind_dtype == "float" else torch.float32))
    return tuple(out)
