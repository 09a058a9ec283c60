"""The masked large forward with a KV cache, against diffusers' own full forward."""

import math

import pytest
import torch

from hybridstitch.engine.torch_backend import TorchDenoiser
from hybridstitch.kvcache import cache_names
from hybridstitch.masks import select_mask
from hybridstitch.tokens import gather_tokens, patchify
from tests.conftest import JOINT_DIM, POOLED_DIM, tiny_transformer


def inputs(batch, size=16, seed=0, t=500.0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, size, size, generator=g),
        torch.randn(batch, 7, JOINT_DIM, generator=g),
        torch.randn(batch, POOLED_DIM, generator=g),
        torch.full((batch,), t),
    )


def plain(model, x, enc, pooled, t):
    return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t, return_dict=False)[0]


@pytest.fixture(scope="module", params=["sd35", "sd3"])
def denoiser(request):
    if request.param == "sd35":
        return TorchDenoiser(tiny_transformer("large", 0))
    return TorchDenoiser(tiny_transformer("small", 1))


def test_store_mode_is_bit_identical_to_diffusers(denoiser):
    x, enc, pooled, t = inputs(2)
    ref = plain(denoiser.model, x, enc, pooled, t)
    out, caches = denoiser.forward_store(x, enc, pooled, t)
    assert torch.equal(out, ref) and torch.equal(denoiser.forward(x, enc, pooled, t), ref)
    # one K/V pair per attention (dual-attention blocks have two), image tokens only, after qk-norm
    assert list(caches) == cache_names(denoiser.spec.attention_slots)
    k, v = caches["cache_k.0.attn"], caches["cache_v.0.attn"]
    assert k.shape == (2, denoiser.spec.num_heads, 64, denoiser.spec.head_dim) == v.shape


@pytest.mark.parametrize("ratio", [0.1, 0.3, 1.0])
def test_masked_forward_with_fresh_cache_equals_full(denoiser, ratio):
    x, enc, pooled, t = inputs(2)
    ref = patchify(plain(denoiser.model, x, enc, pooled, t), 2)  # [B, N, p*p*C]
    _, caches = denoiser.forward_store(x, enc, pooled, t)
    before = {name: c.clone() for name, c in caches.items()}
    k = math.ceil(ratio * 64)
    idx = select_mask(torch.rand(2, 64, generator=torch.Generator().manual_seed(3)), k)
    out, new = denoiser.forward_masked(x, enc, pooled, t, idx, caches)
    assert out.shape == (2, k, 16 * 4)
    torch.testing.assert_close(out, gather_tokens(ref, idx), rtol=1e-5, atol=1e-5)
    # a fresh cache rewritten with fresh K/V is unchanged (every layer); the inputs are not modified
    for name, c0 in before.items():
        torch.testing.assert_close(new[name], c0, rtol=1e-5, atol=1e-5)
        assert torch.equal(caches[name], c0)


def test_masked_every_layer_hidden_states(denoiser):
    """Layer by layer: the masked run's hidden states equal the full run's at the masked tokens."""
    x, enc, pooled, t = inputs(1)
    model = denoiser.model
    full_states, masked_states = [], []
    hooks = [b.register_forward_hook(lambda m, a, o, s=full_states: s.append(o[1])) for b in model.transformer_blocks]
    _, caches = denoiser.forward_store(x, enc, pooled, t)
    for h in hooks:
        h.remove()
    idx = select_mask(torch.rand(1, 64, generator=torch.Generator().manual_seed(5)), 20)
    hooks = [b.register_forward_hook(lambda m, a, o, s=masked_states: s.append(o[1])) for b in model.transformer_blocks]
    denoiser.forward_masked(x, enc, pooled, t, idx, caches)
    for h in hooks:
        h.remove()
    assert len(full_states) == len(masked_states) == denoiser.spec.num_layers
    for full, masked in zip(full_states, masked_states):
        torch.testing.assert_close(masked, gather_tokens(full, idx), rtol=1e-5, atol=1e-5)


def test_cfg_batch_shared_mask_per_sample_different_across_samples():
    den = TorchDenoiser(tiny_transformer("large", 0))
    # batch 2 samples -> CFG batch 4 laid out [uncond_0, uncond_1, cond_0, cond_1]
    x, enc, pooled, t = inputs(4, seed=7)
    x = torch.cat([x[:2], x[:2]])
    ref = patchify(plain(den.model, x, enc, pooled, t), 2)
    _, caches = den.forward_store(x, enc, pooled, t)
    idx = torch.stack([torch.arange(0, 64, 4), torch.arange(1, 64, 4)])  # different masks per sample
    idx_cfg = torch.cat([idx, idx])  # one mask shared by the two CFG halves
    out, _ = den.forward_masked(x, enc, pooled, t, idx_cfg, caches)
    torch.testing.assert_close(out, gather_tokens(ref, idx_cfg), rtol=1e-5, atol=1e-5)


def test_stale_cache_differs_and_updates_masked_positions_only():
    den = TorchDenoiser(tiny_transformer("large", 0))
    x, enc, pooled, t = inputs(1)
    _, caches = den.forward_store(x, enc, pooled, t)
    x2 = x + 0.5 * torch.randn_like(x)
    idx = torch.arange(0, 64, 3)[None]
    out, new = den.forward_masked(x2, enc, pooled, t * 0.9, idx, caches)
    ref = gather_tokens(patchify(plain(den.model, x2, enc, pooled, t * 0.9), 2), idx)
    assert not torch.allclose(out, ref, atol=1e-4)  # stale K/V elsewhere: an approximation
    unmasked = torch.tensor([n for n in range(64) if n % 3])
    for name in caches:
        assert torch.equal(new[name][:, :, unmasked], caches[name][:, :, unmasked])
        assert not torch.allclose(new[name][:, :, idx[0]], caches[name][:, :, idx[0]])
