"""The torch denoiser as functional graphs with fixed input/output names, ready for export.

Two graphs are exported (one resolution each; batch and masked-token count are symbolic):

=========  =================================================  ==================================================
graph      inputs                                             outputs
=========  =================================================  ==================================================
``small``  latents, prompt_embeds, pooled, timestep           velocity
``large``  latents, index, prompt_embeds, pooled, timestep,   tokens, new_cache_k.{slot}, new_cache_v.{slot} ...
           cache_k.{slot}, cache_v.{slot} ...
=========  =================================================  ==================================================

Shapes (``batch`` and ``k`` symbolic): latents [batch, C, H, W]; prompt_embeds
[batch, T, joint_attention_dim]; pooled [batch, pooled_projection_dim]; timestep [batch] float32
(sigma * 1000); index [batch, k] int64; velocity [batch, C_out, H, W]; tokens
[batch, k, p*p*C_out]; every cache [batch, heads, N, head_dim].

The large model exists once: its one graph runs the masked tokens of any k over the caches,
and the full step is the same graph at k = N with index = 0..N-1 (every cache row rewritten,
the tokens unpatchified into the velocity by the runtime). With a fresh cache a masked forward
equals the full forward at those tokens, so k = N is the full forward.
``full_large`` (the large model's own full forward with cache outputs) is kept as a reference
for benchmarks and tests; the export does not build it.

A slot is one attention with an image-token cache, named ``{layer}.{attn|attn2}`` (``attn2``
for the dual-attention blocks of SD3.5 Medium), in the order of
:attr:`TransformerSpec.attention_slots`. Cache outputs are named ``new_`` + the input's name,
so a runtime binds one step's outputs as the next step's inputs by name; one tensor per slot
(not one stacked tensor) keeps each cache write a single contiguous buffer and lets TensorRT
alias each one in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridstitch.denoiser import TransformerSpec
from hybridstitch.engine.manifest import BATCH, MASKED
from hybridstitch.engine.torch_backend import (
    TorchDenoiser,
    TorchKVCache,
    _StitchContext,
    masked_transformer_forward,
)

FULL_INPUTS = ("latents", "prompt_embeds", "pooled", "timestep")
MASKED_INPUTS = ("latents", "index", "prompt_embeds", "pooled", "timestep")
KINDS = ("small", "large", "full_large")


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
    """The fixed shapes of one export: latent size and text tokens (and the batch examples are made with)."""

    batch: int
    latent_height: int
    latent_width: int
    text_tokens: int

    def image_tokens(self, spec: TransformerSpec) -> int:
        p = spec.patch_size
        return (self.latent_height // p) * (self.latent_width // p)


Dim = int | str  # a fixed size, or the name of a symbolic dimension (BATCH, MASKED)


def io_shapes(kind: str, spec: TransformerSpec, shapes: GraphShapes, masked_tokens: int | None = None,
              symbolic: bool = True) -> tuple[list, list]:
    """(inputs, outputs) of a graph: lists of ``(name, shape, dtype)`` with dtype ``"float"`` (the
    engine precision), ``"float32"`` or ``"int64"``. With ``symbolic`` the batch (and k) are the
    names ``"batch"`` (and ``"k"``), else ``shapes.batch`` (and ``masked_tokens``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown graph kind {kind!r}")
    b: Dim = BATCH if symbolic else shapes.batch
    k: Dim = MASKED if symbolic else masked_tokens
    h, w, t = shapes.latent_height, shapes.latent_width, shapes.text_tokens
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
    if kind == "small":
        return [latents, *text], [velocity]
    if kind == "full_large":
        return [latents, *text], [velocity, *[(name, cache_shape, "float") for name in cache_names(spec)]]
    assert symbolic or masked_tokens is not None
    inputs = [latents, ("index", [b, k], "int64"), *text, *[(name, cache_shape, "float") for name in cache_names(spec)]]
    outputs = [("tokens", [b, k, p * p * spec.out_channels], "float")]
    outputs += [(name, cache_shape, "float") for name in cache_names(spec, "new_")]
    return inputs, outputs


def dynamic_shapes(kind: str, spec: TransformerSpec, shapes: GraphShapes) -> dict:
    """``torch.export`` dynamic shapes of a graph's forward arguments: the batch of every input
    and the masked-token count k of ``index`` (1..N)."""
    from torch.export import Dim as ExportDim

    batch = ExportDim(BATCH, min=1, max=1 << 16)
    k = ExportDim(MASKED, min=1, max=shapes.image_tokens(spec))
    inputs, _ = io_shapes(kind, spec, shapes)
    dims = {name: {i: {BATCH: batch, MASKED: k}[d] for i, d in enumerate(shape) if isinstance(d, str)}
            for name, shape, _ in inputs}
    args = {name: dims[name] for name in (MASKED_INPUTS if kind == "large" else FULL_INPUTS)}
    if kind == "large":
        args["caches"] = tuple(dims[name] for name in cache_names(spec))
    return args


def trace_sizes(spec: TransformerSpec, shapes: GraphShapes) -> tuple[int, int]:
    """(batch, k) of the example a symbolic graph is traced with: sizes no other dimension has,
    so ``torch.export`` cannot confuse a symbol with a fixed size (a batch of 2 would equal the
    patch size)."""
    fixed = {1, spec.patch_size, spec.num_heads, spec.head_dim, spec.in_channels, shapes.text_tokens,
             shapes.latent_height, shapes.latent_width, spec.joint_attention_dim, spec.pooled_projection_dim}
    n = shapes.image_tokens(spec)
    batch = next(b for b in range(3, 100) if b not in fixed)
    k = next((c for c in range(max(2, (n + 2) // 3), n) if c not in fixed | {batch}), n)
    return batch, k


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
    kind: str, spec: TransformerSpec, shapes: GraphShapes, dtype: torch.dtype, masked_tokens: int | None = None,
    seed: int = 0, batch: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Random inputs of a graph (batch ``shapes.batch`` unless given; ``masked_tokens`` for the
    large graph); indices sorted, distinct."""
    b = shapes.batch if batch is None else batch
    if kind == "large" and masked_tokens is None:
        raise ValueError("the large graph's example needs masked_tokens")
    inputs, _ = io_shapes(kind, spec, GraphShapes(b, shapes.latent_height, shapes.latent_width, shapes.text_tokens),
                          masked_tokens, symbolic=False)
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


GRAPH_MODULES = {"small": FullGraph, "large": MaskedLargeGraph, "full_large": FullLargeGraph}
