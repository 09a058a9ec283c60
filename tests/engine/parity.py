"""Parity checks of an engine backend against the torch denoiser, shared by the backends' tests."""

import torch

from hybridstitch.masks import select_mask
from hybridstitch.tokens import gather_tokens, patchify
from tests.conftest import JOINT_DIM, POOLED_DIM


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def inputs(batch=2, seed=0, t=500.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 8, 8, generator=g), torch.randn(batch, 7, JOINT_DIM, generator=g),
            torch.randn(batch, POOLED_DIM, generator=g), torch.full((batch,), t))


def assert_caches_match(cache, ref_cache) -> None:
    """Every slot's K and V of an engine cache against the torch cache, relative error < 1e-5."""
    got = cache.to_torch()
    for (layer, attn), (k, v) in ref_cache.layers.items():
        assert rel(got[f"cache_k.{layer}.{attn}"], k) < 1e-5 and rel(got[f"cache_v.{layer}.{attn}"], v) < 1e-5


def assert_masked_parity(engines, large, ratio) -> None:
    """Masked forwards with a fresh and then a stale cache equal torch's (and the full forward's
    masked tokens when fresh); the caches agree after both."""
    x, pe, pooled, t = inputs(seed=1)
    cache, ref_cache = engines.large.new_cache(2, 8, 8), large.new_cache(2, 8, 8)
    engines.large.forward(x, pe, pooled, t, cache=cache)
    full = large.forward(x, pe, pooled, t, cache=ref_cache)
    bucket = engines.large.bucket_for(ratio, 16)
    assert bucket.ratio == ratio
    k = bucket.masked_tokens
    g = torch.Generator().manual_seed(2)
    # fresh: equals the torch masked forward and the full forward at the masked tokens
    idx = select_mask(torch.rand(2, 16, generator=g), k)
    out = engines.large.forward_masked(x, pe, pooled, t, idx, cache)
    assert out.shape == (2, k, 64)
    assert rel(out, large.forward_masked(x, pe, pooled, t, idx, ref_cache)) < 1e-5
    assert rel(out, gather_tokens(patchify(full, 2), idx)) < 1e-5
    # stale: a later step on a moved latent, with new masked positions, over the cache of both steps
    x2 = x + 0.3 * torch.randn(x.shape, generator=g)
    idx2 = select_mask(torch.rand(2, 16, generator=g), k)
    out2 = engines.large.forward_masked(x2, pe, pooled, t * 0.8, idx2, cache)
    assert rel(out2, large.forward_masked(x2, pe, pooled, t * 0.8, idx2, ref_cache)) < 1e-5
    assert_caches_match(cache, ref_cache)
