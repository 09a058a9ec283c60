"""The ``torch.library`` op ``hybridstitch::cached_kv_attention`` on CPU."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hybridstitch.plugins import cached_kv_attention, cached_kv_attention_reference
from hybridstitch.plugins.torch_op import cached_kv_attention_op


def _inputs(b, h, n, k, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, key, v = (torch.randn(b, h, k + t, d, generator=g) for _ in range(3))  # [B, H, k+T, D]
    cache_k, cache_v = (torch.randn(b, h, n, d, generator=g) for _ in range(2))  # [B, H, N, D]
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])  # [B, k]
    return q, key, v, cache_k, cache_v, index


SHAPES = {"basic": (2, 2, 12, 3, 4, 8), "T0": (2, 2, 12, 3, 0, 8), "k0": (1, 2, 12, 0, 4, 8)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_op_equals_reference_bit_for_bit(shape):
    args = _inputs(*SHAPES[shape])
    before = [a.clone() for a in args]
    got = torch.ops.hybridstitch.cached_kv_attention(*args)
    want = cached_kv_attention_reference(*args)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(args, before)), "the op is functional: inputs stay as they were"
    assert got[0].is_contiguous()


def test_dispatcher_on_cpu_is_the_reference():
    args = _inputs(*SHAPES["basic"])
    got = cached_kv_attention(*args)
    want = cached_kv_attention_reference(*args)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_fake_impl_gives_shapes_for_tracing():
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) for a in _inputs(*SHAPES["basic"])]
        out, new_k, new_v = cached_kv_attention_op(*args)
    assert out.shape == (2, 2, 7, 8) and new_k.shape == new_v.shape == (2, 2, 12, 8)
    assert out.dtype == torch.float32


def test_opcheck():
    # schema, fake tensor, autograd registration and AOT-dispatch checks of torch.library
    torch.library.opcheck(cached_kv_attention_op, _inputs(*SHAPES["basic"]))
