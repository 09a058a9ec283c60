"""Per-sample caches batched for a call and handed back, with no copy when the rows line up."""

from __future__ import annotations

import torch

from hybridstitch import kvcache


def batch(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(rows, 2, 5, 3, generator=g) for name in kvcache.cache_names([(0, "attn"), (1, "attn")])}


def test_the_same_samples_in_order_get_the_previous_batch_itself():
    b = batch(6)
    rows = kvcache.split(b, [2, 1, 3])
    assert kvcache.gather(rows) is b
    assert all(torch.equal(rows[1].caches()[n], b[n][2:3]) for n in b)


def test_other_orders_and_subsets_get_the_right_rows():
    b, other = batch(6), batch(2, seed=1)
    rows = kvcache.split(b, [2, 1, 3])
    for picked, expect in (
        ([rows[1], rows[2]], lambda n: b[n][2:]),  # consecutive: a view of b
        ([rows[2], rows[0]], lambda n: torch.cat([b[n][3:], b[n][:2]])),  # out of order: copied
        ([rows[0], other], lambda n: torch.cat([b[n][:2], other[n]])),  # with another sample's dict
    ):
        got = kvcache.gather(picked)
        assert set(got) == set(b)
        assert all(torch.equal(got[n], expect(n)) for n in b)
    assert kvcache.gather([rows[1], rows[2]])["cache_k.0.attn"]._base is b["cache_k.0.attn"]


def test_join_is_a_view_only_of_consecutive_rows():
    x = torch.randn(8, 3, 4)
    parts = list(torch.split(x, [2, 2, 4]))
    assert kvcache.join(parts) is x
    assert kvcache.join(parts[1:])._base is x and torch.equal(kvcache.join(parts[1:]), x[2:])
    swapped = kvcache.join([parts[1], parts[0]])
    assert swapped._base is None and torch.equal(swapped, torch.cat([x[2:4], x[:2]]))
    y = torch.randn(2, 3, 4)
    assert torch.equal(kvcache.join([parts[0], y]), torch.cat([x[:2], y]))
