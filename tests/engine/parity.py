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


def assert_caches_match(caches, ref) -> None:
    """Every slot's K and V of an engine's caches against torch's, relative error < 1e-5."""
    assert list(caches) == list(ref)
    for name, want in ref.items():
        assert rel(caches[name].float().cpu(), want) < 1e-5, name


def assert_masked_parity(engines, large, ratio) -> None:
    """Masked forwards with a fresh and then a stale cache equal torch's (and the full forward's
    masked tokens when fresh); the caches agree after both."""
    x, pe, pooled, t = inputs(seed=1)
    _, caches = engines.large.forward_store(x, pe, pooled, t)
    full, ref = large.forward_store(x, pe, pooled, t)
    bucket = engines.large.bucket_for(ratio, 16)
    assert bucket.ratio == ratio
    k = bucket.masked_tokens
    g = torch.Generator().manual_seed(2)
    # fresh: equals the torch masked forward and the full forward at the masked tokens
    idx = select_mask(torch.rand(2, 16, generator=g), k)
    out, caches = engines.large.forward_masked(x, pe, pooled, t, idx, caches)
    want, ref = large.forward_masked(x, pe, pooled, t, idx, ref)
    assert out.shape == (2, k, 64)
    assert rel(out, want) < 1e-5
    assert rel(out, gather_tokens(patchify(full, 2), idx)) < 1e-5
    # stale: a later step on a moved latent, with new masked positions, over the cache of both steps
    x2 = x + 0.3 * torch.randn(x.shape, generator=g)
    idx2 = select_mask(torch.rand(2, 16, generator=g), k)
    out2, caches = engines.large.forward_masked(x2, pe, pooled, t * 0.8, idx2, caches)
    want2, ref = large.forward_masked(x2, pe, pooled, t * 0.8, idx2, ref)
    assert rel(out2, want2) < 1e-5
    assert_caches_match(caches, ref)
