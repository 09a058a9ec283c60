"""``hybridstitch calibrate``: the Pareto front, the preset rule, and a tiny sweep end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hybridstitch.config import StitchConfig
from hybridstitch.testbed import LARGE_DIR
from hybridstitch.testbed import calibrate as C

torch.set_num_threads(1)

needs_weights = pytest.mark.skipif(
    not os.path.isfile(os.path.join(LARGE_DIR, "transformer", "config.json")),
    reason="testbed weights not trained (python -m hybridstitch.testbed.train)",
)


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 3.0), (2.5, 4.0), (4.0, 1.0), (1.0, 6.0)]
    assert C.pareto_front(pts) == [0, 1, 4]  # (3,3), (2.5,4), (1,6) are dominated


def test_sweep_configs_keeps_decreasing_thresholds_only():
    cfgs = C.sweep_configs((0.3,), (0.2, 0.02), (0.03, 0.01), (0.005,))
    names = [c.name for c in cfgs]
    assert names[:4] == ["large", "small", "t-stitch", "srdiffusion@0.005"]
    hs = [c for c in cfgs if c.method == "hybridstitch"]
    assert [c.thresholds for c in hs] == [(0.2, 0.03), (0.2, 0.01), (0.02, 0.01)]  # (0.02, 0.03) is not decreasing


def _row(name, method, dist, acc, ms, ratios=(), thr=(), srd=0.005):
    return dict(name=name, method=method, feature_distance=dist, accuracy=acc, modelled_seconds_per_image=ms,
                mask_ratios=list(ratios), thresholds=list(thr), srdiffusion_threshold=srd)


def test_choose_presets_picks_the_fastest_acceptable_config_and_derives_the_ablations():
    rows = [
        _row("large", "large", 0.0, 0.97, 10.0),
        _row("small", "small", 10.0, 0.90, 1.0),
        _row("srd@a", "srdiffusion", 4.0, 0.96, 5.0, srd=0.01),
        _row("srd@b", "srdiffusion", 6.0, 0.96, 3.0, srd=0.03),  # too far from large
        _row("hs30@fast", "hybridstitch", 6.0, 0.97, 2.0, (0.3,), (0.2, 0.03)),  # too far
        _row("hs30@mid", "hybridstitch", 3.0, 0.96, 4.0, (0.3,), (0.2, 0.022)),  # acceptable, fastest of those
        _row("hs30@slow", "hybridstitch", 1.0, 0.97, 6.0, (0.3,), (0.05, 0.018)),
        _row("hs10@lowacc", "hybridstitch", 2.0, 0.90, 2.0, (0.1,), (0.2, 0.03)),  # accuracy too low
        _row("hs10@ok", "hybridstitch", 4.5, 0.97, 3.0, (0.1,), (0.2, 0.022)),
    ]
    p = C.choose_presets(rows, (0.03, 0.022, 0.018), max_accuracy_drop=0.02, max_distance_fraction=0.5)
    assert p["testbed-30"]["thresholds"] == (0.2, 0.022) and p["testbed-30"]["source"] == "hs30@mid"
    assert p["testbed-10"]["thresholds"] == (0.2, 0.022)
    assert p["testbed-srdiffusion"]["srdiffusion_threshold"] == 0.01
    assert p["testbed-30-static"]["mask_mode"] == "static" and p["testbed-30-fulllarge"]["stage2_large"] == "full"
    assert p["testbed-30-10"] == dict(mask_ratios=(0.3, 0.1), thresholds=(0.2, 0.022, 0.018), source="testbed-30")
    assert "testbed-40-30" not in p  # no 40 % sweep
    for kw in p.values():
        StitchConfig(**{k: v for k, v in kw.items() if k != "source"})


def test_choose_presets_falls_back_to_the_closest_config():
    rows = [
        _row("large", "large", 0.0, 0.97, 10.0),
        _row("small", "small", 10.0, 0.90, 1.0),
        _row("hs20@a", "hybridstitch", 8.0, 0.97, 2.0, (0.2,), (0.2, 0.03)),
        _row("hs20@b", "hybridstitch", 7.0, 0.97, 3.0, (0.2,), (0.2, 0.018)),
    ]
    p = C.choose_presets(rows, (0.03, 0.018))
    assert p["testbed-20"]["source"] == "hs20@b"
    assert p["testbed-20-10"]["thresholds"] == (0.2, 0.018, round(0.8 * 0.018, 6))


@needs_weights
def test_tiny_sweep_writes_table_plot_and_valid_presets(tmp_path):
    out = tmp_path / "cal"
    rc = C.main(["--samples", "10", "--steps", "4", "--ratios", "0.3", "--thresholds-1", "0.2",
                 "--thresholds-2", "0.03", "--srdiffusion", "0.01", "--latency-rounds", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "calibration.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["large", "small", "t-stitch", "srdiffusion@0.01", "hs-30@0.2,0.03"]
    assert rows["large"]["feature_distance"] == 0.0 and rows["large"]["modelled_speedup"] == pytest.approx(1.0)
    assert rows["small"]["modelled_speedup"] > 1.0 and rows["small"]["feature_distance"] > 0.0
    assert rows["t-stitch"]["mean_switch_steps"] == [2.0]  # floor(0.4 * 4 + 0.5)
    assert rows["large"]["front_fd"] or rows["small"]["front_fd"]
    assert set(result["presets"]) == {"testbed-30", "testbed-srdiffusion", "testbed-30-static", "testbed-30-fulllarge", "testbed-30-10"}
    assert result["presets"]["testbed-30"]["thresholds"] == [0.2, 0.03]
    assert "| hs-30@0.2,0.03 |" in (out / "calibration.md").read_text()
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_wires_calibrate():
    from hybridstitch.cli import build_parser

    args = build_parser().parse_args(["calibrate", "--ratios", "0.1,0.3", "--samples", "20"])
    assert args.ratios == (0.1, 0.3) and args.samples == 20 and args.thresholds_2 == C.DEFAULT_THRESHOLDS_2
