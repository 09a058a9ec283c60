import pytest

from hybridstitch import HybridStitchError, StitchConfig
from hybridstitch.config import PRESETS

PAPER = {
    "hybridstitch-10": ((0.1,), (0.3, 0.25)),
    "hybridstitch-20": ((0.2,), (0.35, 0.25)),
    "hybridstitch-30": ((0.3,), (0.5, 0.3)),
    "hybridstitch-40": ((0.4,), (0.4, 0.3)),
    "hybridstitch-20-10": ((0.2, 0.1), (0.5, 0.3, 0.2)),
    "hybridstitch-30-10": ((0.3, 0.1), (0.5, 0.3, 0.2)),
    "hybridstitch-40-30": ((0.4, 0.3), (0.6, 0.5, 0.3)),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_presets(name):
    cfg = StitchConfig.preset(name)
    assert (cfg.mask_ratios, cfg.thresholds) == PAPER[name]
    assert cfg.method == "hybridstitch" and cfg.name == name


def test_every_named_operating_point_exists():
    for name in ["large", "small", "t-stitch", "srdiffusion", "hybridstitch-30-static", "hybridstitch-30-fulllarge", *PAPER]:
        StitchConfig.preset(name)
    assert StitchConfig.preset("hybridstitch-30-static").mask_mode == "static"
    assert StitchConfig.preset("hybridstitch-30-fulllarge").stage2_large == "full"
    assert StitchConfig.preset("t-stitch").tstitch_small_fraction == 0.4
    assert StitchConfig.preset("srdiffusion").srdiffusion_threshold == 0.005
    assert set(PRESETS) >= set(PAPER)


def test_custom_config_and_lists():
    cfg = StitchConfig(mask_ratios=[0.3], thresholds=[0.5, 0.3])
    assert cfg.mask_ratios == (0.3,) and cfg.thresholds == (0.5, 0.3)
    assert hash(cfg)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(mask_ratios=(0.3,), thresholds=(0.3, 0.5)), "strictly decreasing"),
        (dict(mask_ratios=(0.3,), thresholds=(0.5, 0.5)), "strictly decreasing"),
        (dict(mask_ratios=(0.3,), thresholds=(0.5,)), "one more threshold than mask ratios"),
        (dict(mask_ratios=(0.3, 0.1), thresholds=(0.5, 0.3)), "one more threshold"),
        (dict(mask_ratios=(0.0,), thresholds=(0.5, 0.3)), "(0, 1]"),
        (dict(mask_ratios=(1.5,), thresholds=(0.5, 0.3)), "(0, 1]"),
        (dict(mask_ratios=(0.1, 0.3), thresholds=(0.5, 0.3, 0.2)), "non-increasing"),
        (dict(mask_ratios=(), thresholds=()), "at least one mask ratio"),
        (dict(mask_ratios=(0.3,), thresholds=(0.5, -0.1)), ">= 0"),
        (dict(method="nope"), "unknown method"),
        (dict(mask_mode="sometimes"), "mask_mode"),
        (dict(tstitch_small_fraction=1.5), "tstitch_small_fraction"),
    ],
)
def test_invalid_configs(kwargs, fragment):
    with pytest.raises(HybridStitchError, match=None) as e:
        StitchConfig(**kwargs)
    assert fragment in str(e.value)


def test_unknown_preset_lists_choices():
    with pytest.raises(HybridStitchError) as e:
        StitchConfig.preset("hybridstitch-50")
    assert "hybridstitch-30" in str(e.value) and "custom" in str(e.value)


TESTBED = ["testbed-10", "testbed-20", "testbed-30", "testbed-40", "testbed-30-static", "testbed-30-fulllarge",
           "testbed-20-10", "testbed-30-10", "testbed-40-30", "testbed-srdiffusion"]


def test_testbed_presets_validate_and_follow_their_derivation():
    for name in TESTBED:
        assert StitchConfig.preset(name).name == name
    for pct in (10, 20, 30, 40):
        cfg = StitchConfig.preset(f"testbed-{pct}")
        assert cfg.method == "hybridstitch" and cfg.mask_ratios == (pct / 100,) and len(cfg.thresholds) == 2
    t30 = StitchConfig.preset("testbed-30")
    static, full = StitchConfig.preset("testbed-30-static"), StitchConfig.preset("testbed-30-fulllarge")
    assert static.thresholds == t30.thresholds and static.mask_mode == "static"
    assert full.thresholds == t30.thresholds and full.stage2_large == "full"
    for multi, first in (("testbed-20-10", "testbed-20"), ("testbed-30-10", "testbed-30"), ("testbed-40-30", "testbed-40")):
        cfg = StitchConfig.preset(multi)
        assert len(cfg.mask_ratios) == 2 and cfg.thresholds[:2] == StitchConfig.preset(first).thresholds
    assert StitchConfig.preset("testbed-srdiffusion").method == "srdiffusion"
