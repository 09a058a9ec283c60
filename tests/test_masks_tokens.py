import math

import pytest
import torch

from hybridstitch.masks import select_mask, token_scores, tokens_for_ratio
from hybridstitch.metrics import predict_x0, relative_l1
from hybridstitch.tokens import gather_tokens, merge_masked, patchify, unpatchify


def test_patchify_matches_diffusers_unpatchify():
    # diffusers: tokens [B, h*w, p*p*C] -> reshape (B,h,w,p,q,C) -> einsum nhwpqc->nchpwq
    x = torch.randn(2, 3, 8, 6)
    t = patchify(x, 2)
    assert t.shape == (2, 12, 12)
    assert torch.equal(unpatchify(t, 2, 8, 6), x)
    # token n = row-major patch; its vector is (p, q, c)
    assert torch.equal(t[1, 4], x[1, :, 2:4, 2:4].permute(1, 2, 0).reshape(-1))


def test_token_scores_reference():
    x0, prev = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    s = token_scores(x0, prev, 2)
    ref = [(x0 - prev)[0, :, r:r + 2, c:c + 2].abs().sum() for r in (0, 2) for c in (0, 2)]
    torch.testing.assert_close(s[0], torch.stack(ref))


def test_select_mask_topk_per_sample():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.0, 0.3, 0.2]])
    idx = select_mask(scores, 2)
    assert idx.tolist() == [[1, 3], [0, 2]]


def test_tokens_for_ratio():
    assert tokens_for_ratio(0.3, 10) == 3
    assert tokens_for_ratio(0.1, 2304) == math.ceil(230.4) == 231
    assert tokens_for_ratio(1.0, 64) == 64
    assert tokens_for_ratio(0.001, 64) == 1


def test_merge_overwrites_only_masked():
    small = torch.randn(2, 4, 4, 4)
    large = torch.randn(2, 4, 4, 4)
    idx = torch.tensor([[0, 3], [1, 2]])
    merged = merge_masked(small, gather_tokens(patchify(large, 2), idx), idx, 2)
    mt, st, lt = patchify(merged, 2), patchify(small, 2), patchify(large, 2)
    for b in range(2):
        for n in range(4):
            ref = lt if n in idx[b].tolist() else st
            assert torch.equal(mt[b, n], ref[b, n])


def test_relative_l1_and_x0():
    x = torch.ones(1, 1, 2, 2)
    v = torch.full((1, 1, 2, 2), 2.0)
    torch.testing.assert_close(predict_x0(x, v, 0.25), torch.full((1, 1, 2, 2), 0.5))
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, -1.0, 1.0])
    assert abs(relative_l1(a, b) - 3.0 / 3.0) < 1e-7


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_row_sums_do_not_depend_on_the_batch(threads):
    """Eq. 9's sums: a sample's own number, bit for bit, alone or among others, at any thread count."""
    from hybridstitch.metrics import relative_l1_rows, row_sums

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for shape in [(1, 32, 32), (16, 64, 64), (4, 16, 24)]:
            x = torch.randn(5, *shape, generator=g) * torch.rand(5, 1, 1, 1, generator=g) * 10
            prev = torch.randn(5, *shape, generator=g)
            together, d_together = row_sums(x), relative_l1_rows(x, prev)
            for i in range(5):
                assert torch.equal(row_sums(x[i:i + 1].clone())[0], together[i])
                assert relative_l1_rows(x[i:i + 1].clone(), prev[i:i + 1].clone())[0] == d_together[i]
    finally:
        torch.set_num_threads(before)
