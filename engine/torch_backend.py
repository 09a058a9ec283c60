"""The torch backend: diffusers' ``SD3Transformer2DModel`` run full, or masked with a KV cache.

The masked forward reuses the model's own modules. Everything in an SD3 block except
attention is per token (AdaLN, norms, FF, projections), so a block run on the masked image
tokens alone is exact there; attention is the one place tokens mix, and there a per-layer
processor (:class:`StitchAttnProcessor`) attends over [cached image K/V, text K/V] through the
``hybridstitch::CachedKVAttention`` op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hybridstitch.denoiser import Bucket, TransformerSpec
from hybridstitch.kvcache import Caches, cache_names
from hybridstitch.masks import tokens_for_ratio
from hybridstitch.plugins import cached_kv_attention
from hybridstitch.tokens import gather_tokens


@dataclass
class TorchKVCache:
    """One request's image-token K/V for every attention slot: ``{(layer, "attn"|"attn2"): (k, v)}``,
    each ``[B, H, N, D]``. Filled by a full forward, read and updated by masked forwards."""

    batch: int
    num_tokens: int
    layers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    filled: bool = False


@dataclass
class _StitchContext:
    """Handed to every processor of one forward through ``joint_attention_kwargs``."""

    mode: str  # "store": full forward that records K/V; "masked": attend over the cache
    cache: TorchKVCache
    index: torch.Tensor | None = None  # [B, k] for "masked"


class StitchAttnProcessor:
    """Joint attention of one attention module, with KV-cache store / masked modes.

    One instance per attention module (it knows its slot). Without a context it defers to
    diffusers' own ``JointAttnProcessor2_0``, so plain forwards stay bit-identical to diffusers.
    The context argument must be named in ``__call__``'s signature, or diffusers drops it.
    """

    def __init__(self, slot: tuple[int, str], base):
        self.slot = slot
        self.base = base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, stitch=None, **kwargs):
        if stitch is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

        batch = hidden_states.shape[0]
        n_img = hidden_states.shape[1]  # N (store) or k (masked)
        # Same op order as diffusers' JointAttnProcessor2_0, so the store mode is bit-identical.
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # [B, n_img, H*D] -> [B, H, n_img, D]
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            # text tokens: [B, T, H*D] -> [B, H, T, D]
            c_q = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            c_k = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            c_v = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                c_q = attn.norm_added_q(c_q)
            if attn.norm_added_k is not None:
                c_k = attn.norm_added_k(c_k)
            query = torch.cat([query, c_q], dim=2)
            key = torch.cat([key, c_k], dim=2)
            value = torch.cat([value, c_v], dim=2)

        if stitch.mode == "store":
            # Image K/V after qk-norm: [B, H, N, D]
            stitch.cache.layers[self.slot] = (key[:, :, :n_img], value[:, :, :n_img])
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        else:
            cache_k, cache_v = stitch.cache.layers[self.slot]
            out, new_k, new_v = cached_kv_attention(query, key, value, cache_k, cache_v, stitch.index)
            stitch.cache.layers[self.slot] = (new_k, new_v)

        # [B, H, n_img + T, D] -> [B, n_img + T, H*D]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, ctx_out = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                ctx_out = attn.to_add_out(ctx_out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if encoder_hidden_states is not None:
            return out, ctx_out
        return out


def install_stitch_processors(model) -> None:
    """Give every attention module of an ``SD3Transformer2DModel`` its own :class:`StitchAttnProcessor`."""
    for i, block in enumerate(model.transformer_blocks):
        for name in ("attn", "attn2"):
            attn = getattr(block, name, None)
            if attn is None:
                continue
            proc = attn.processor
            if isinstance(proc, StitchAttnProcessor):
                continue
            attn.set_processor(StitchAttnProcessor((i, name), proc))


def masked_transformer_forward(model, latents, prompt_embeds, pooled, timestep, index, cache: TorchKVCache):
    """The large model on the masked image tokens + all text tokens.

    latents [B, C, H, W], index [B, k] -> masked tokens' output [B, k, p*p*C_out]; ``cache`` updated.
    Patch embedding (with its positional embedding) runs on the full latent, then the masked
    tokens are gathered, so every token keeps its own position.
    """
    hidden = model.pos_embed(latents)  # [B, N, C]
    hidden = gather_tokens(hidden, index).contiguous()  # [B, k, C]
    temb = model.time_text_embed(timestep, pooled)  # [B, C]
    context = model.context_embedder(prompt_embeds)  # [B, T, C]
    ctx = {"stitch": _StitchContext("masked", cache, index)}
    for block in model.transformer_blocks:
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, joint_attention_kwargs=ctx)
    hidden = model.norm_out(hidden, temb)
    return model.proj_out(hidden)  # [B, k, p*p*C_out]


def caches_of(cache: TorchKVCache, spec: TransformerSpec) -> Caches:
    """A TorchKVCache as the engines' I/O dict: ``{"cache_k.{layer}.{attn}": k, "cache_v...": v}``."""
    out = {}
    for (layer, attn), (k, v) in cache.layers.items():
        out[f"cache_k.{layer}.{attn}"], out[f"cache_v.{layer}.{attn}"] = k, v
    return {name: out[name] for name in cache_names(spec.attention_slots)}


def cache_from(caches: Caches, spec: TransformerSpec) -> TorchKVCache:
    """The inverse of :func:`caches_of` (views, no copies)."""
    first = next(iter(caches.values()))
    cache = TorchKVCache(batch=first.shape[0], num_tokens=first.shape[2], filled=True)
    for layer, attn in spec.attention_slots:
        cache.layers[(layer, attn)] = (caches[f"cache_k.{layer}.{attn}"], caches[f"cache_v.{layer}.{attn}"])
    return cache


class TorchDenoiser:
    """A diffusers ``SD3Transformer2DModel`` behind the :class:`~hybridstitch.denoiser.Denoiser` interface."""

    backend = "torch"

    def __init__(self, model, name: str = "transformer"):
        self.model = model.eval()
        self.name = name
        self.spec = TransformerSpec.from_config(model.config)
        install_stitch_processors(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def validate_request(self, batch: int, height: int, width: int, mask_ratios=()) -> None:
        """Eager torch serves any batch, size and ratio (size limits are checked by the pipeline)."""

    def bucket_for(self, ratio: float, num_tokens: int) -> Bucket:
        return Bucket(ratio=ratio, masked_tokens=tokens_for_ratio(ratio, num_tokens))

    def _run(self, latents, prompt_embeds, pooled, timestep, cache: TorchKVCache | None):
        kwargs = None if cache is None else {"stitch": _StitchContext("store", cache)}
        return self.model(
            hidden_states=latents.to(self.dtype),
            encoder_hidden_states=prompt_embeds.to(self.dtype),
            pooled_projections=pooled.to(self.dtype),
            timestep=timestep,
            joint_attention_kwargs=kwargs,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def forward(self, latents, prompt_embeds, pooled, timestep):
        return self._run(latents, prompt_embeds, pooled, timestep, None)

    @torch.no_grad()
    def forward_store(self, latents, prompt_embeds, pooled, timestep):
        cache = TorchKVCache(batch=latents.shape[0], num_tokens=0)
        velocity = self._run(latents, prompt_embeds, pooled, timestep, cache)
        return velocity, caches_of(cache, self.spec)

    @torch.no_grad()
    def forward_masked(self, latents, prompt_embeds, pooled, timestep, index, caches: Caches):
        cache = cache_from(caches, self.spec)
        tokens = masked_transformer_forward(
            self.model, latents.to(self.dtype), prompt_embeds.to(self.dtype), pooled.to(self.dtype), timestep, index,
            cache,
        )
        return tokens, caches_of(cache, self.spec)
