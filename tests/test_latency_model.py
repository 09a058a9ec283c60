"""The latency model (Eqs. 3-8) against hand-computed cases, and the mask-ratio bound warning."""

import time
import warnings

import pytest
import torch

from hybridstitch import HybridStitchError, HybridStitchPipeline, StitchConfig
from hybridstitch.latency_model import (
    CallLatencies,
    LatencyBoundWarning,
    break_even_ratio,
    check_latency_bound,
    mask_ratio_bound,
    per_call_medians,
    predict,
    predict_from_counts,
    predict_from_trace,
    stage_counts_from_trace,
)
from hybridstitch.trace import StepRecord, Trace
from tests.conftest import text_inputs


def test_single_mask_by_hand():
    # T = 50, large 0-14, masked (r = 0.3) 15-34, small 35-49; t_l = 1, t_s = 0.25, t_l(0.3) = 0.45
    p = predict(50, [15, 35], [0.3], t_l=1.0, t_s=0.25, t_l_r={0.3: 0.45})
    assert p.large_seconds == pytest.approx(15 * 1.0 + 20 * 0.45)  # 24
    assert p.small_seconds == pytest.approx(35 * 0.25)  # 8.75
    assert p.total_seconds == pytest.approx(32.75)
    assert p.large_only_seconds == pytest.approx(50.0)
    assert p.speedup == pytest.approx(50 / 32.75)


def test_multi_mask_by_hand():
    # large 0-9, r = 0.3 on 10-19, r = 0.1 on 20-29, small 30-49
    p = predict(50, [10, 20, 30], [0.3, 0.1], t_l=2.0, t_s=0.5, t_l_r={0.3: 0.8, 0.1: 0.5})
    assert p.large_seconds == pytest.approx(2.0 * 10 + 0.8 * 10 + 0.5 * 10)  # 33
    assert p.small_seconds == pytest.approx(0.5 * 40)  # 20
    assert p.speedup == pytest.approx(100 / 53)


def test_baselines_fit_the_same_formula():
    t = dict(t_l=1.0, t_s=0.3)
    assert predict(50, [50], [], **t).total_seconds == pytest.approx(50.0)
    assert predict(50, [], [], **t).total_seconds == pytest.approx(50.0)  # large only
    assert predict(50, [0], [], **t).total_seconds == pytest.approx(15.0)  # small only
    srd = predict(50, [25], [], **t)  # SRDiffusion: large 0-24, small after
    assert (srd.large_seconds, srd.small_seconds) == pytest.approx((25.0, 7.5))


def test_a_run_that_never_left_the_masked_stage():
    # switch steps missing at the end count as T
    p = predict(50, [15], [0.3], t_l=1.0, t_s=0.25, t_l_r={0.3: 0.45})
    assert p.total_seconds == pytest.approx(15 + 35 * 0.45 + 35 * 0.25)


def test_counts_and_fulllarge():
    lat = CallLatencies(1.0, 0.25, {0.3: 0.45})
    p = predict_from_counts(15, {0.3: 20}, 15, lat)
    assert p.total_seconds == pytest.approx(32.75)
    full = predict_from_counts(15, {0.3: 20}, 15, lat, masked_runs_full_large=True)
    assert full.large_seconds == pytest.approx(35.0)  # t_l, not t_l(r), on the 20 masked steps
    assert full.speedup == pytest.approx(50 / (35 + 35 * 0.25))


def test_bad_inputs():
    with pytest.raises(HybridStitchError, match="non-decreasing"):
        predict(50, [35, 15], [0.3], 1.0, 0.2, {0.3: 0.4})
    with pytest.raises(HybridStitchError, match="within 0..50"):
        predict(50, [10, 60], [0.3], 1.0, 0.2, {0.3: 0.4})
    with pytest.raises(HybridStitchError, match="at most 2 switch steps"):
        predict(50, [10, 20, 30], [0.3], 1.0, 0.2, {0.3: 0.4})
    with pytest.raises(HybridStitchError, match=r"no measured masked-call latency t_l\(r\) for r = 0.2 \(measured: 0.3\)"):
        predict(50, [10, 30], [0.2], 1.0, 0.2, {0.3: 0.4})


def _trace(kinds, seconds, config=None, ratio=0.3):
    """A hand-made trace: one step per kind with the given per-call seconds."""
    steps = []
    for i, (kind, secs) in enumerate(zip(kinds, seconds)):
        steps.append(StepRecord(step=i, timestep=0.0, sigma=0.0, stage=1, stage_kind=kind, d=None,
                                mask_ratio=ratio if kind == "masked" else None,
                                bucket_ratio=ratio if kind == "masked" else None, seconds=dict(secs)))
    return Trace(config=(config or StitchConfig.preset("hybridstitch-30")).to_dict(), num_steps=len(kinds),
                 height=8, width=8, batch=1, backend="torch", steps=steps)


def test_trace_counts_any_order():
    # T-Stitch runs small first: the model counts stages, it does not assume large comes first
    tr = _trace(["small"] * 4 + ["large"] * 6, [{"small": 0.25}] * 4 + [{"large": 1.0}] * 6, StitchConfig.preset("t-stitch"))
    assert stage_counts_from_trace(tr) == (6, {}, 4)
    p = predict_from_trace(tr, CallLatencies(1.0, 0.25))
    assert p.total_seconds == pytest.approx(6 + 1.0) and p.speedup == pytest.approx(10 / 7)


def test_per_call_medians_and_prediction_from_a_trace():
    kinds = ["large", "large", "masked", "masked", "masked", "small"]
    secs = [{"large": 1.0}, {"large": 1.2}, {"small": 0.2, "large_masked": 0.5}, {"small": 0.3, "large_masked": 0.4},
            {"small": 0.25, "large_masked": 0.45}, {"small": 0.25}]
    tr = _trace(kinds, secs)
    lat = per_call_medians(tr)
    assert lat.large == pytest.approx(1.1) and lat.small == pytest.approx(0.25)
    assert lat.masked == {0.3: pytest.approx(0.45)}
    p = predict_from_trace(tr, lat)
    assert p.large_seconds == pytest.approx(2 * 1.1 + 3 * 0.45)
    assert p.small_seconds == pytest.approx(4 * 0.25)


def test_bound():
    assert mask_ratio_bound(1.0, 0.25, 0.7)
    assert not mask_ratio_bound(1.0, 0.25, 0.75)  # equal is not faster
    assert break_even_ratio(1.0, 0.25) == pytest.approx(0.75)
    cfg = StitchConfig.preset("hybridstitch-30-10")
    msgs = check_latency_bound(cfg, {"large": 1.0, "small": 0.25, "large_masked": {0.3: 0.8, 0.1: 0.5}})
    assert len(msgs) == 1 and "mask ratio 0.3" in msgs[0] and "below about 75%" in msgs[0]
    assert check_latency_bound(cfg, {"large": 1.0, "small": 0.25, "large_masked": {0.3: 0.7, 0.1: 0.5}}) == []
    # unmeasured ratios, baselines and FullLarge say nothing
    assert check_latency_bound(cfg, {"large": 1.0, "small": 0.25}) == []
    assert check_latency_bound(StitchConfig.preset("srdiffusion"), {"large": 1.0, "small": 0.9}) == []
    full = StitchConfig.preset("hybridstitch-30-fulllarge")
    assert check_latency_bound(full, {"large": 1.0, "small": 0.25, "large_masked": {0.3: 0.9}}) == []
    msg = check_latency_bound(StitchConfig.preset("hybridstitch-10"), {"large": 1.0, "small": 0.999, "large_masked": {0.1: 0.2}})
    assert "no mask ratio pays off" in msg[0]


class SlowMasked:
    """The tiny large model with a masked forward made slower than a full one."""

    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward_masked(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner.forward_masked(*args, **kwargs)


def _stitched(pipe, config, **kw):
    return pipe(config=config, num_inference_steps=6, guidance_scale=4.5, height=64, width=64, output_type="latent",
                progress=False, generator=torch.Generator().manual_seed(0), **text_inputs(1), **kw)


def test_pipeline_warns_once_per_config_when_masked_steps_cost_more(tiny_pipe):
    pipe = HybridStitchPipeline(SlowMasked(tiny_pipe.large, 0.05), tiny_pipe.small, tiny_pipe.scheduler)
    cfg = StitchConfig(mask_ratios=(0.3,), thresholds=(float("inf"), 0.0), name="always-masked")
    with pytest.warns(LatencyBoundWarning, match="always-masked: at mask ratio 0.3") as rec:
        _stitched(pipe, cfg)
    assert len([w for w in rec if issubclass(w.category, LatencyBoundWarning)]) == 1
    assert rec[0].filename == __file__  # points at the caller, not at the pipeline
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatencyBoundWarning)
        _stitched(pipe, cfg)  # the same config again: no second warning
        _stitched(pipe, "large")  # no masked stage: nothing to check
    with pytest.warns(LatencyBoundWarning):
        _stitched(pipe, cfg.replace(name="another"))  # another config warns once too
