"""The stage policy alone, on scripted difference sequences."""

from hybridstitch import StagePolicy, StitchConfig
from hybridstitch.policy import tstitch_first_large_step


def run(config, ds):
    """Feed d_1..d_T (None for step 0); return the stage kind + ratio per step and switch steps."""
    policy = StagePolicy(config, len(ds))
    seen = []
    for i, d in enumerate(ds):
        st = policy.stage_for_step(i)
        seen.append((st.index, st.kind, st.mask_ratio))
        policy.observe(i, d)
    return seen, policy.switch_steps


def test_single_mask_transitions():
    cfg = StitchConfig(mask_ratios=(0.3,), thresholds=(0.5, 0.3))
    ds = [None, 0.9, 0.6, 0.45, 0.4, 0.35, 0.29, 0.2, 0.1]
    seen, switches = run(cfg, ds)
    kinds = [k for _, k, _ in seen]
    # d_3 = 0.45 < 0.5 -> masked from step 4; d_6 = 0.29 < 0.3 -> small from step 7
    assert kinds == ["large"] * 4 + ["masked"] * 3 + ["small"] * 2
    assert switches == [4, 7]
    assert all(r == 0.3 for _, k, r in seen if k == "masked")


def test_never_skips_masked_stage():
    cfg = StitchConfig(mask_ratios=(0.2, 0.1), thresholds=(0.5, 0.3, 0.2))
    # d_1 is already below every threshold: still one step in each masked stage.
    ds = [None, 0.01, 0.01, 0.01, 0.01, 0.01]
    seen, switches = run(cfg, ds)
    assert [(i, k, r) for i, k, r in seen] == [
        (1, "large", None), (1, "large", None), (2, "masked", 0.2), (3, "masked", 0.1), (4, "small", None), (4, "small", None)
    ]
    assert switches == [2, 3, 4]


def test_thresholds_that_never_fire_stay_large():
    cfg = StitchConfig(mask_ratios=(0.3,), thresholds=(1e-30, 0.0))
    seen, switches = run(cfg, [None] + [0.001] * 9)
    assert {k for _, k, _ in seen} == {"large"} and switches == []


def test_rising_difference_does_not_go_back():
    cfg = StitchConfig(mask_ratios=(0.3,), thresholds=(0.5, 0.3))
    seen, _ = run(cfg, [None, 0.4, 0.9, 0.9, 0.9])
    assert [k for _, k, _ in seen] == ["large", "large", "masked", "masked", "masked"]


def test_tstitch_switch_step():
    assert tstitch_first_large_step(50, 0.4) == 20
    assert tstitch_first_large_step(28, 0.4) == 11  # 11.2 -> 11
    assert tstitch_first_large_step(10, 0.0) == 0
    seen, switches = run(StitchConfig.preset("t-stitch"), [None] + [0.5] * 49)
    kinds = [k for _, k, _ in seen]
    assert kinds[:20] == ["small"] * 20 and kinds[20:] == ["large"] * 30
    assert switches == [20]


def test_srdiffusion_criterion():
    cfg = StitchConfig.preset("srdiffusion").replace(srdiffusion_threshold=0.01)
    # tanh drops: 0.5->0.3 large drop, 0.3->0.25 drop ~0.045, 0.25->0.245 drop ~0.0047 < 0.01 -> fire
    ds = [None, 0.5, 0.3, 0.25, 0.245, 0.24, 0.2]
    seen, switches = run(cfg, ds)
    assert [k for _, k, _ in seen] == ["large"] * 5 + ["small"] * 2
    assert switches == [5]
    # a rising difference (negative drop) does not fire
    seen, switches = run(cfg, [None, 0.3, 0.31, 0.32])
    assert switches == []


def test_single_model_methods():
    for name, kind in (("large", "large"), ("small", "small")):
        seen, switches = run(StitchConfig.preset(name), [None, 0.0, 0.0])
        assert {k for _, k, _ in seen} == {kind} and switches == []
