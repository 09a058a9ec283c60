"""Cache freshness (issue 16): cache ages per sample and token, the four refresh options, and the
per-sigma difference. Unit tests on :class:`MaskSelector` / :class:`StagePolicy`, then the tiny pipeline."""

import math

import pytest
import torch

from hybridstitch import HybridStitchError, StagePolicy, StitchConfig, kvcache
from hybridstitch.masks import MaskSelector, oldest_first, select_mask
from hybridstitch.policy import Stage
from tests.test_pipeline import STEPS, run

LARGE, MASKED = Stage(1, "large"), Stage(2, "masked", 0.25)
N = 16  # tokens of an 8x8 latent with patch 2


def selector(**kw) -> MaskSelector:
    sel = MaskSelector("dynamic", 2, **kw)
    g = torch.Generator().manual_seed(0)
    sel.observe(torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g))
    return sel


def test_ages_count_steps_since_the_large_model_computed_each_token():
    sel = selector()
    assert sel.ages() is None and sel.plan(LARGE, 3) == LARGE
    sel.plan(MASKED, 4)
    assert torch.equal(sel.ages(), torch.ones(1, N, dtype=torch.int64))  # written at step 3: 1 step old
    first = sel.select(4)
    sel.plan(MASKED, 5)
    ages = sel.ages()
    assert torch.equal(ages[0, first[0]], torch.ones(4, dtype=torch.int64))  # refreshed at step 4
    rest = torch.ones(N, dtype=torch.bool)
    rest[first[0]] = False
    assert torch.equal(ages[0, rest], torch.full((N - 4,), 2))
    assert sel.mean_age() == pytest.approx((4 * 1 + 12 * 2) / N)
    sel.plan(LARGE, 6)  # a full large step rewrites every entry
    sel.plan(MASKED, 7)
    assert torch.equal(sel.ages(), torch.ones(1, N, dtype=torch.int64))


def test_without_freshness_options_the_mask_is_the_papers():
    sel = selector()
    sel.plan(LARGE, 0)
    for step in range(1, 6):
        sel.plan(MASKED, step)
        assert torch.equal(sel.select(5), select_mask(sel.scores, 5))


def test_round_robin_refresh_reaches_every_token():
    sel = selector(refresh_share=1.0)  # every masked token goes to the oldest entries
    sel.plan(LARGE, 0)
    seen = []
    for step in range(1, 5):
        sel.plan(MASKED, step)
        seen.append(sel.select(4)[0].tolist())
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # reading order, ties by position
    sel.plan(MASKED, 5)
    assert int(sel.ages().max()) == 4  # nothing older than one sweep


def test_refresh_share_splits_k_between_scores_and_age():
    sel = selector(refresh_share=0.5)
    sel.plan(LARGE, 0)
    sel.plan(MASKED, 1)
    index = sel.select(6)[0]
    top = set(select_mask(sel.scores, 3)[0].tolist())
    assert top <= set(index.tolist()) and len(set(index.tolist())) == 6  # 3 by score, 3 oldest others


def test_oldest_first_skips_excluded_and_prefers_low_positions():
    ages = torch.tensor([[3, 5, 5, 1, 5]])
    got = oldest_first(ages, torch.tensor([[1]]), 2)
    assert sorted(got[0].tolist()) == [2, 4]


def test_age_weight_lets_an_old_entry_outrank_a_slightly_more_unstable_one():
    sel = MaskSelector("dynamic", 1, age_weight=1.0)
    x0_prev = torch.zeros(1, 1, 1, 4)
    sel.observe(torch.tensor([[[[1.0, 1.1, 0.0, 0.0]]]]), x0_prev)  # token 1 the most unstable
    sel.plan(LARGE, 0)
    sel.plan(MASKED, 1)
    assert sel.select(1).tolist() == [[1]]
    sel.plan(MASKED, 2)  # token 0 is now 2 steps old, token 1 one step: 1/0.525 + 2 > 1.1/0.525 + 1
    assert sel.select(1).tolist() == [[0]]


def test_refresh_every_turns_the_masked_step_after_m_into_a_full_step():
    sel = selector(refresh_every=2)
    kinds = []
    for step, stage in enumerate([LARGE, LARGE, MASKED, MASKED, MASKED, MASKED, MASKED, MASKED, MASKED]):
        planned = sel.plan(stage, step)
        kinds.append(planned.kind)
        if planned.kind == "masked":
            sel.select(4)
    assert kinds == ["large", "large", "masked", "masked", "large", "masked", "masked", "large", "masked"]
    assert sel.refreshes == [4, 7]
    assert sel.plan(Stage(3, "small"), 9).kind == "small"  # the small stage is never touched


def test_refresh_age_bounds_the_mean_cache_age():
    sel = selector(refresh_age=1.5)
    sel.plan(LARGE, 0)
    means, kinds = [], []
    for step in range(1, 9):
        planned = sel.plan(MASKED, step)
        kinds.append(planned.kind)
        means.append(sel.mean_age())
        if planned.kind == "masked":
            sel.select(4)
    # a masked step runs only while the mean age is within the bound: after one masked step at k = 4 of 16
    # the mean age is (4 * 1 + 12 * 2) / 16 = 1.75 > 1.5, so every second step is a full one
    assert all(m <= 1.5 for m, k in zip(means, kinds) if k == "masked")
    assert kinds == ["masked", "large"] * 4 and sel.refreshes == [2, 4, 6, 8]


def test_sigma_difference_divides_by_the_sigma_interval():
    sigmas = [1.0, 0.9, 0.5, 0.4, 0.0]
    cfg = StitchConfig(mask_ratios=(0.3,), thresholds=(1.0, 0.5), difference="sigma")
    policy = StagePolicy(cfg, 4, sigmas)
    assert policy.normalized(2, 0.2) == pytest.approx(0.5)  # 0.2 / (0.9 - 0.5)
    policy.observe(0, None)
    policy.observe(1, 0.12)  # 0.12 / 0.1 = 1.2: stays large (a per-step threshold would fire)
    assert policy.stage.kind == "large"
    policy.observe(2, 0.36)  # 0.36 / 0.4 = 0.9 < 1.0
    assert policy.stage.kind == "masked" and policy.switch_steps == [3]
    with pytest.raises(HybridStitchError, match="sigmas"):
        StagePolicy(cfg, 4).normalized(1, 0.1)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(refresh_share=1.5), "refresh_share"),
    (dict(age_weight=-1.0), "age_weight"),
    (dict(age_weight=math.inf), "age_weight"),
    (dict(refresh_every=2.5), "refresh_every must be an integer"),
    (dict(refresh_every=-1), "refresh_every"),
    (dict(refresh_age=0.5), ">= 1 step"),
    (dict(refresh_every=2, stage2_large="full"), "stage2_large='masked'"),
    (dict(refresh_share=0.2, mask_mode="static"), "mask_mode='dynamic'"),
    (dict(difference="steps"), "difference must be"),
    (dict(method="t-stitch", mask_ratios=(), thresholds=(), difference="sigma"), "keep difference='step'"),
    (dict(method="large", mask_ratios=(), thresholds=(), refresh_age=2.0), "method='hybridstitch'"),
])
def test_bad_freshness_values_say_how_to_fix(kwargs, fragment):
    with pytest.raises(HybridStitchError) as e:
        StitchConfig(**kwargs)
    assert fragment in str(e.value)


VARIANTS = [dict(refresh_share=0.5), dict(age_weight=0.2), dict(refresh_every=1), dict(refresh_age=1.2),
            dict(difference="sigma")]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: next(iter(kw)))
def test_variants_whose_thresholds_never_fire_reproduce_large_exactly(tiny_pipe, kw):
    never = StitchConfig(mask_ratios=(0.3,), thresholds=(1e-30, 0.0), **kw)
    out, _, _ = run(tiny_pipe, never)
    ref, _, _ = run(tiny_pipe, "large")
    assert torch.equal(out.images, ref.images) and out.trace.switch_steps == []


def test_refresh_steps_run_the_full_large_model_and_rewrite_the_cache(tiny_pipe):
    cfg = StitchConfig(mask_ratios=(0.3,), thresholds=(math.inf, 0.0), refresh_every=2)
    out, _, _ = run(tiny_pipe, cfg, batch=2)
    for trace in out.traces:
        kinds = [(s.stage, s.stage_kind) for s in trace.steps]
        # large, large, then masked x2 + one full large step (stage 2, kind large), again
        assert kinds == [(1, "large"), (1, "large"), (2, "masked"), (2, "masked"), (2, "large"),
                         (2, "masked"), (2, "masked"), (2, "large")][:STEPS]
        assert trace.switch_steps == [2]
        assert all("large" in s.seconds and "small" not in s.seconds for s in trace.steps if s.stage_kind == "large")

    # the cache after a refresh step is the full forward's at that step
    call = tiny_pipe.prepare(config=cfg, num_inference_steps=STEPS, guidance_scale=4.5, height=64, width=64,
                             latents=torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
                             output_type="latent", progress=False, **_embeds())
    s = call.samples[0]
    for _ in range(4):
        tiny_pipe.advance([s])
    inputs = (s.latents.expand(2, -1, -1, -1), s.prompt_embeds, s.pooled, s.timestep.reshape(1).expand(2))
    tiny_pipe.advance([s])  # step 4: the refresh
    assert s.trace.steps[-1].stage_kind == "large" and s.masks.refreshes == [4]
    _, expected = tiny_pipe.large.forward_store(*inputs)
    caches = kvcache.gather([s.caches])  # the sample's rows of the refresh call's caches, as a dict
    for name, t in expected.items():
        torch.testing.assert_close(caches[name], t, rtol=0, atol=0)


def _embeds():
    from tests.conftest import text_inputs

    return text_inputs(1)


def test_round_robin_refresh_in_a_run_sweeps_the_image(tiny_pipe):
    cfg = StitchConfig(mask_ratios=(0.25,), thresholds=(math.inf, 0.0), refresh_share=1.0)
    out, _, _ = run(tiny_pipe, cfg, record_masks=True)
    masks = [s.mask_index[0] for s in out.trace.steps if s.stage_kind == "masked"]
    assert masks[:4] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
