"""The latency benchmark: replayed schedules, overhead accounting, summaries, and a tiny end-to-end run."""

import json
import time

import pytest
import torch

from hybridstitch import HybridStitchError, HybridStitchPipeline, StitchConfig
from hybridstitch.bench import (
    BackendResult,
    ReplaySwitches,
    RunRecord,
    main,
    replay_denoise,
    replay_stages,
    summarize_backend,
    synthetic_shapes,
)
from hybridstitch.conditioning import Conditioning
from hybridstitch.policy import Stage
from hybridstitch.trace import StepRecord, Trace
from tests.conftest import text_inputs

SW = ReplaySwitches(stitch=(3, 7), tstitch=4, srdiffusion=5)


def kinds(name, steps=10, switches=SW):
    return "".join({"large": "L", "masked": "M", "small": "S"}[s.kind] for s in replay_stages(StitchConfig.preset(name), steps, switches))


def test_replayed_schedules():
    assert kinds("large") == "L" * 10
    assert kinds("small") == "S" * 10
    assert kinds("t-stitch") == "SSSSLLLLLL"  # small first
    assert kinds("srdiffusion") == "LLLLLSSSSS"
    assert kinds("hybridstitch-30") == "LLLMMMMSSS"
    assert kinds("hybridstitch-30-fulllarge") == "LLLMMMMSSS"
    stages = replay_stages(StitchConfig.preset("hybridstitch-30-10"), 10, SW)  # [3, 7) split evenly
    assert [s.mask_ratio for s in stages[3:7]] == [0.3, 0.3, 0.1, 0.1]
    assert [s.index for s in stages] == [1, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    multi = ReplaySwitches(stitch=(3, 7), tstitch=4, srdiffusion=5, multi=(2, 3, 8))
    assert kinds("hybridstitch-30-10", switches=multi) == "LLMMMMMMSS"
    d = ReplaySwitches.default(50)
    assert (d.stitch, d.tstitch, d.srdiffusion) == ((15, 35), 20, 25)


def test_replay_errors():
    with pytest.raises(HybridStitchError, match="first masked step must be >= 2"):
        replay_stages(StitchConfig.preset("hybridstitch-30"), 10, ReplaySwitches((1, 5), 4, 5))
    with pytest.raises(HybridStitchError, match="non-decreasing"):
        replay_stages(StitchConfig.preset("hybridstitch-30"), 10, ReplaySwitches((6, 5), 4, 5))
    with pytest.raises(HybridStitchError, match="needs 3 switch steps"):
        replay_stages(StitchConfig.preset("hybridstitch-30-10"), 10, ReplaySwitches((3, 7), 4, 5, multi=(3, 7)))


def _pipe_run(pipe, config, steps=8, **kw):
    emb = text_inputs(1)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(config=config, num_inference_steps=steps, guidance_scale=4.5, height=64, width=64, latents=latents,
               output_type="latent", progress=False, **emb, **kw)
    cond = Conditioning(torch.cat([emb["negative_prompt_embeds"], emb["prompt_embeds"]]),
                        torch.cat([emb["negative_pooled_prompt_embeds"], emb["pooled_prompt_embeds"]]))
    return out, latents, cond


@pytest.mark.filterwarnings("ignore::hybridstitch.latency_model.LatencyBoundWarning")  # tiny models
@pytest.mark.parametrize("mode", ["dynamic", "static", "full"])
def test_replay_reproduces_the_pipeline(tiny_pipe, mode):
    # The replay driver given the pipeline's own stage decisions gives the pipeline's latents, bit for bit.
    cfg = StitchConfig(mask_ratios=(0.3, 0.1), thresholds=(float("inf"), 1e9, 1e8), name="all-stages",
                       mask_mode="static" if mode == "static" else "dynamic", stage2_large="full" if mode == "full" else "masked")
    out, latents, cond = _pipe_run(tiny_pipe, cfg)
    stages = [Stage(s.stage, s.stage_kind, s.mask_ratio) for s in out.trace.steps]
    replayed, trace = replay_denoise(tiny_pipe.large, tiny_pipe.small, tiny_pipe.scheduler, latents, cond, cfg, stages, 4.5)
    assert torch.equal(replayed, out.images)
    assert trace.switch_steps == out.trace.switch_steps == [2, 3, 4]
    assert [s.masked_tokens for s in trace.steps] == [s.masked_tokens for s in out.trace.steps]
    assert [set(s.seconds) for s in trace.steps] == [set(s.seconds) for s in out.trace.steps]


class SlowDenoiser:
    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner.forward(*args, **kwargs)


def test_overhead_accounting_adds_up(tiny_pipe):
    delay = 0.01
    pipe = HybridStitchPipeline(SlowDenoiser(tiny_pipe.large, delay), SlowDenoiser(tiny_pipe.small, delay), tiny_pipe.scheduler)
    t0 = time.perf_counter()
    out, _, _ = _pipe_run(pipe, "srdiffusion", steps=6)
    wall = time.perf_counter() - t0
    rec = RunRecord.from_trace(out.trace)
    assert rec.model_seconds >= 6 * delay  # one call per step, each at least the delay
    assert min(rec.loop_overhead_seconds, rec.outside_seconds) >= 0
    assert rec.model_seconds + rec.loop_overhead_seconds + rec.outside_seconds == pytest.approx(rec.seconds, abs=1e-12)
    assert out.trace.total_seconds <= wall
    step_sum = sum(sum(s.seconds.values()) + s.overhead_seconds for s in out.trace.steps)
    assert step_sum <= out.trace.total_seconds
    assert rec.overhead_share == pytest.approx(1 - rec.model_seconds / rec.seconds)


def _hand_trace(name, kinds, t_l=0.1, t_s=0.04, t_m=0.05, overhead=0.001):
    cfg = StitchConfig.preset(name)
    steps = []
    for i, k in enumerate(kinds):
        secs = {"L": {"large": t_l}, "S": {"small": t_s}, "M": {"small": t_s, "large_masked": t_m}}[k]
        steps.append(StepRecord(step=i, timestep=0.0, sigma=0.0, stage=1, stage_kind={"L": "large", "S": "small", "M": "masked"}[k],
                                d=None, mask_ratio=0.3 if k == "M" else None, bucket_ratio=0.3 if k == "M" else None,
                                seconds=secs, overhead_seconds=overhead))
    tr = Trace(config=cfg.to_dict(), num_steps=len(kinds), height=8, width=8, batch=1, backend="torch", steps=steps)
    tr.total_seconds = sum(sum(s.seconds.values()) + s.overhead_seconds for s in steps) + 0.002
    tr.switch_steps = [i for i in range(1, len(kinds)) if kinds[i] != kinds[i - 1]]
    return tr


def test_summary_by_hand():
    res = BackendResult()
    for name, ks in (("large", "LLLLLLLLLL"), ("hybridstitch-30", "LLLMMMMSSS")):
        tr = _hand_trace(name, ks)
        res.traces[name] = [tr]
        res.runs[name] = [RunRecord.from_trace(tr)]
    s = summarize_backend(res)
    assert s["per_call"]["large"]["median"] == pytest.approx(0.1)
    assert s["per_call"]["small"]["median"] == pytest.approx(0.04)
    assert s["bound"] == [pytest.approx({"ratio": 0.3, "t_l_r": 0.05, "t_l_r_over_t_l": 0.5, "t_l_r_plus_t_s": 0.09,
                                         "t_l": 0.1, "holds": True})]
    hs = s["methods"]["hybridstitch-30"]
    large_total = 10 * 0.101 + 0.002
    hs_total = 3 * 0.101 + 4 * 0.091 + 3 * 0.041 + 0.002
    assert hs["seconds"]["median"] == pytest.approx(hs_total)
    assert hs["speedup"] == pytest.approx(large_total / hs_total)
    assert hs["model"]["total_seconds"] == pytest.approx(3 * 0.1 + 4 * 0.05 + 7 * 0.04)
    assert hs["measured_over_model"] == pytest.approx(hs_total / (3 * 0.1 + 4 * 0.05 + 7 * 0.04))
    assert hs["switch_steps"] == [3, 7] and hs["stage_counts"] == {"large": 3, "masked": 4, "small": 3}
    assert hs["overhead_share"] == pytest.approx((10 * 0.001 + 0.002) / hs_total)
    assert summarize_backend(BackendResult(status="n/a", reason="why")) == {"status": "n/a", "reason": "why"}


def test_synthetic_shapes_keep_the_real_ratios():
    s = synthetic_shapes(16)
    assert s["image_tokens"] == 144 and s["text_tokens"] == 21  # 2304 / 16, 333 / 16
    assert s["large"]["num_layers"] == 38 and s["small"]["num_layers"] == 24
    wl = s["large"]["num_attention_heads"] * s["large"]["attention_head_dim"]
    ws = s["small"]["num_attention_heads"] * s["small"]["attention_head_dim"]
    assert (wl, ws) == (152, 96)  # 2432 / 16, 1536 / 16
    real = synthetic_shapes(1)
    assert real["image_tokens"] == 2304 and real["text_tokens"] == 333 and real["joint_attention_dim"] == 4096


def test_bench_end_to_end_tiny(tiny_dirs, tmp_path):
    out = tmp_path / "results"
    rc = main([
        "--testbed-large", tiny_dirs[0], "--testbed-small", tiny_dirs[1], "--testbed-size", "64", "--testbed-steps", "6",
        "--synthetic-scale", "64", "--synthetic-layers", "2", "1", "--synthetic-steps", "6", "--switch-steps", "2", "4",
        "--backends", "eager,tensorrt", "--synthetic-backends", "eager", "--reps", "1", "--out-dir", str(out),
        "--name", "tiny", "--no-progress", "--engine-cache", str(tmp_path / "engines"),
    ])
    assert rc == 0
    report = json.loads((out / "tiny.json").read_text())
    assert (out / "tiny.png").stat().st_size > 1000
    md = (out / "tiny.md").read_text()
    assert "## testbed" in md and "## synthetic" in md and "t_l(r) + t_s < t_l" in md
    for wname in ("testbed", "synthetic"):
        w = report["workloads"][wname]
        eager = w["backends"]["eager"]
        assert eager["status"] == "ok"
        assert set(eager["methods"]) == set(w["methods"]) and len(w["methods"]) == 11
        assert eager["methods"]["large"]["speedup"] == pytest.approx(1.0)
        for e in eager["methods"].values():
            assert e["model"]["total_seconds"] > 0 and e["measured_over_model"] > 0
            assert 0 <= e["overhead_share"] < 1
        assert [b["ratio"] for b in eager["bound"]] == [0.1, 0.2, 0.3, 0.4]
    assert report["workloads"]["testbed"]["backends"]["tensorrt"]["status"] == "n/a"
    syn = report["workloads"]["synthetic"]["backends"]["eager"]["methods"]
    assert syn["hybridstitch-30"]["switch_steps"] == [2, 4] and syn["t-stitch"]["stage_counts"] == {"small": 2, "large": 4}
    assert report["meta"]["threads"] == 1


def test_missing_testbed_is_reported_not_fatal(tmp_path):
    rc = main(["--workloads", "testbed", "--testbed-large", str(tmp_path / "nope"), "--testbed-small", str(tmp_path / "nope"),
               "--out-dir", str(tmp_path), "--name", "none", "--no-progress", "--no-plot"])
    assert rc == 0
    w = json.loads((tmp_path / "none.json").read_text())["workloads"]["testbed"]
    assert w["status"] == "n/a" and "testbed weights not found" in w["reason"]


def test_bad_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--methods", "large,fastest"])
    assert "unknown fastest" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_onnxruntime_backend_tiny(tiny_dirs, tmp_path):
    # exports the pair once into the engine cache (buckets: the methods' ratios), then reuses it
    args = ["--workloads", "testbed,synthetic", "--testbed-large", tiny_dirs[0], "--testbed-small", tiny_dirs[1],
            "--testbed-size", "64", "--testbed-steps", "6", "--synthetic-scale", "64", "--synthetic-layers", "2", "1",
            "--synthetic-steps", "6", "--switch-steps", "2", "4", "--methods", "large,hybridstitch-30",
            "--backends", "eager,onnxruntime", "--synthetic-backends", "onnxruntime", "--reps", "1",
            "--out-dir", str(tmp_path), "--name", "ort", "--no-progress", "--no-plot",
            "--engine-cache", str(tmp_path / "engines")]
    assert main(args) == 0
    report = json.loads((tmp_path / "ort.json").read_text())
    for wname in ("testbed", "synthetic"):
        ort = report["workloads"][wname]["backends"]["onnxruntime"]
        assert ort["status"] == "ok", ort.get("reason")
        assert [b["ratio"] for b in ort["bound"]] == [0.3]
        assert ort["methods"]["hybridstitch-30"]["stage_counts"]["masked"] >= 1
    tb = report["workloads"]["testbed"]["backends"]
    assert tb["onnxruntime"]["methods"]["large"]["speedup_vs_eager_large"] > 0
    assert main(args) == 0  # the second run reuses the exported engines
