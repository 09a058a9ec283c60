"""Definition and torch reference of the cached-KV concat attention op.

Semantics (DESIGN.md section 5). For one attention layer of the masked large model:

    query, key, value : [B, H, k + T, D]   current tokens: the k masked image tokens first, then T text tokens
    cache_k, cache_v  : [B, H, N, D]       the layer's image-token K/V (after qk-norm) from earlier steps
    index             : [B, k] int64       positions of the masked image tokens in 0..N-1

    cache_k' = cache_k with cache_k'[b, :, index[b, j]] = key[b, :, j]   for j < k   (same for V)
    out      = softmax(query @ [cache_k', key[:, :, k:]]^T * D^-0.5) @ [cache_v', value[:, :, k:]]
             : [B, H, k + T, D]

returns (out, cache_k', cache_v'). The key order of the attention is [all N image tokens,
then the T text tokens], exactly the order of diffusers' joint attention, so with a fresh
cache the output equals the full model's attention at those query rows. T may be 0 (the
image-only ``attn2`` of SD3.5 dual-attention blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The node's identity in ONNX and TensorRT: op type, custom domain (= TensorRT
# plugin_namespace) and version (= plugin_version). Defined once, here.
OP_DOMAIN = "hybridstitch"
OP_NAME = "CachedKVAttention"
OP_VERSION = "1"


def scatter_cache(cache: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """Out-of-place write of ``fresh`` [B, H, k, D] into ``cache`` [B, H, N, D] at ``index`` [B, k]."""
    b, h, k, d = fresh.shape
    # index: [B, k] -> [B, H, k, D], the layout torch.scatter wants on axis 2
    full_index = index[:, None, :, None].expand(b, h, k, d)
    return cache.scatter(2, full_index, fresh)


def cached_kv_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch reference of the op (see the module docstring)."""
    k = index.shape[1]
    new_k = scatter_cache(cache_k, index, key[:, :, :k])
    new_v = scatter_cache(cache_v, index, value[:, :, :k])
    # keys: [B, H, N + T, D], image tokens first as in diffusers' joint attention
    keys = torch.cat([new_k, key[:, :, k:]], dim=2)
    values = torch.cat([new_v, value[:, :, k:]], dim=2)
    out = F.scaled_dot_product_attention(query, keys, values, dropout_p=0.0, is_causal=False)
    return out, new_k, new_v
