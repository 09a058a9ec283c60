"""The synthetic workload's shapes: the real models' ratios at a CPU-feasible scale."""

import math

import pytest

from hybridstitch.bench.synthetic import flop_ratios, synthetic_shapes


def test_synthetic_shapes_keep_the_real_ratios():
    s = synthetic_shapes(16)
    assert s["image_tokens"] == 144 and s["text_tokens"] == 21  # 2304 / 16, 333 / 16
    assert s["large"]["num_layers"] == 38 and s["small"]["num_layers"] == 24
    wl = s["large"]["num_attention_heads"] * s["large"]["attention_head_dim"]
    ws = s["small"]["num_attention_heads"] * s["small"]["attention_head_dim"]
    assert (wl, ws) == (152, 96)  # 2432 / 16, 1536 / 16
    real = synthetic_shapes(1)
    assert real["image_tokens"] == 2304 and real["text_tokens"] == 333 and real["joint_attention_dim"] == 4096


def test_flop_ratios_are_the_query_fractions_of_the_real_models():
    f = flop_ratios()
    n, t = 2304, 333
    # Per query token the cost is the same in a masked and a full forward: the ratio is the query count's.
    for r, v in f["t_l_r_over_t_l"].items():
        assert v == pytest.approx((math.ceil(r * n) + t) / (n + t))
    # SD3 Medium is shallower and narrower: well under half of SD3.5 Large's arithmetic.
    assert 0.2 < f["t_s_over_t_l"] < 0.5
    assert max(f["t_l_r_over_t_l"].values()) < 1 - f["t_s_over_t_l"]  # by FLOPs, every bucket is under the break-even
