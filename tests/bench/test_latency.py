"""The latency benchmark: overhead accounting, summaries, settings, and tiny end-to-end runs."""

import functools
import importlib.util
import json
import time

import pytest
import torch

from hybridstitch import HybridStitchError, HybridStitchPipeline, StitchConfig
from hybridstitch.bench.backends import BackendUnavailable, WorkloadSettings
from hybridstitch.bench.latency import (
    BackendResult,
    LatencySettings,
    RunRecord,
    build_parser,
    main,
    measure_workload,
    settings_from_args,
    summarize_backend,
)
from hybridstitch.trace import StepRecord, Trace
from tests.bench.test_replay import _pipe_run


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
    trt = report["workloads"]["testbed"]["backends"]["tensorrt"]
    assert trt["status"] == "n/a"
    if importlib.util.find_spec("tensorrt") is None:  # the export's own refusal, not a stub's
        assert trt["reason"].startswith("TensorRT is not installed: pip install hybridstitch[gpu]")
        assert "tensorrt: n/a (TensorRT is not installed" in md
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


# -- settings ---------------------------------------------------------------------------------------


def test_command_line_defaults_are_the_settings_defaults():
    assert settings_from_args(build_parser().parse_args([])) == LatencySettings()


def test_command_line_becomes_typed_settings():
    args = build_parser().parse_args([
        "--methods", "large,hybridstitch-30", "--reps", "2", "--threads", "2", "--switch-steps", "3", "9",
        "--multi-switch-steps", "2", "4", "8", "--synthetic-layers", "4", "2", "--testbed-size", "64",
        "--tensorrt-precision", "fp32", "--no-plot",
    ])
    s = settings_from_args(args)
    assert s.common == WorkloadSettings(methods=("large", "hybridstitch-30"), threads=2, tensorrt_precision="fp32",
                                        engine_cache=args.engine_cache)
    assert s.synthetic.switch_steps == (3, 9) and s.synthetic.multi_switch_steps == (2, 4, 8)
    assert s.synthetic.layers == (4, 2) and s.testbed.size == 64 and s.reps == 2 and not s.plot
    sw = s.synthetic.switches()
    assert sw.stitch == (3, 9) and sw.multi == (2, 4, 8)


@pytest.mark.parametrize("kw,match", [
    (dict(reps=0), "--reps must be >= 1"),
    (dict(backends=("eager", "cuda")), "unknown backend"),
    (dict(common=dict(methods=("fastest",))), "unknown method"),
    (dict(common=dict(methods=("large",), threads=0)), "--threads must be >= 1"),
    (dict(common=dict(methods=("large",), tensorrt_precision="int8")), "--tensorrt-precision must be one of fp16, fp32"),
])
def test_bad_settings_say_what_to_pass(kw, match):
    with pytest.raises(HybridStitchError, match=match):
        LatencySettings(**{k: WorkloadSettings(**v) if k == "common" else v for k, v in kw.items()})


def test_bad_reps_exit_2_with_the_fix(tmp_path, capsys):
    assert main(["--reps", "0", "--out-dir", str(tmp_path), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("hybridstitch bench: error: --reps must be >= 1")


# -- a failing backend is reported, the others measured ------------------------------------------------


class HandWorkload:
    """Hand-made traces on two backends; ``flaky`` fails on its second timed call."""

    name = "hand"
    methods = ["large", "hybridstitch-30"]

    def __init__(self):
        self.calls = 0

    def runner(self, backend):
        if backend == "missing":
            raise BackendUnavailable("missing is not installed here")
        if backend == "broken":
            raise RuntimeError("engine build exploded\nsecond line")
        kinds = {"large": "LLLLLLLLLL", "hybridstitch-30": "LLLMMMMSSS"}

        def run(config, warmup):
            if backend == "flaky" and not warmup:
                self.calls += 1
                if self.calls > 2:
                    raise ValueError("lost the device")
            return _hand_trace(config.name, kinds[config.name])

        return run


def test_failing_backends_are_reported_and_the_others_measured():
    res = measure_workload(HandWorkload(), ["ok", "missing", "broken", "flaky"], reps=3, compile_budget_s=1.0, progress=False)
    assert res["ok"].status == "ok" and [len(res["ok"].runs[m]) for m in HandWorkload.methods] == [3, 3]
    assert res["missing"].reason == "missing is not installed here"
    assert res["broken"].reason == "could not build: RuntimeError: engine build exploded"
    assert res["flaky"].status == "n/a" and res["flaky"].reason == "failed: ValueError: lost the device"
    assert res["flaky"].runs == {}  # nothing half-measured is summarised
    assert summarize_backend(res["ok"])["methods"]["hybridstitch-30"]["switch_steps"] == [3, 7]


def test_compile_warmup_budget_drops_the_backend():
    class Slow(HandWorkload):
        def runner(self, backend):
            inner = super().runner("ok")

            def run(config, warmup):
                time.sleep(0.02)
                return inner(config, warmup)

            return run

    res = measure_workload(Slow(), ["eager", "compile"], reps=1, compile_budget_s=0.01, progress=False)
    assert res["eager"].status == "ok"
    assert res["compile"].reason.startswith("torch.compile warm-up passed the 0.01 s budget (--compile-budget-s)")


# -- the TensorRT column ----------------------------------------------------------------------------


def _trt_args(tiny_dirs, tmp_path, name):
    return ["--workloads", "testbed", "--testbed-large", tiny_dirs[0], "--testbed-small", tiny_dirs[1],
            "--testbed-size", "64", "--testbed-steps", "6", "--methods", "large,hybridstitch-30",
            "--backends", "eager,tensorrt", "--reps", "1", "--out-dir", str(tmp_path), "--name", name,
            "--no-progress", "--no-plot", "--engine-cache", str(tmp_path / "engines")]


@pytest.mark.slow
def test_tensorrt_column_exports_and_loads_through_from_engines(tiny_dirs, tmp_path, monkeypatch):
    # TensorRT swapped for the CPU fakes (tests/tensorrt_fakes.py) where it is reached -- the export's
    # toolchain, the runtime's loader -- so the column's real path runs: hybridstitch.export
    # with backend="tensorrt", then HybridStitchPipeline.from_engines(dir, backend="tensorrt").
    from hybridstitch.engine import tensorrt_backend
    from hybridstitch.export import read_manifest, tensorrt_build
    from tests.tensorrt_fakes import ADA, FakeRuntime, FakeToolchain

    monkeypatch.setattr(tensorrt_build, "TensorRTToolchain", lambda: FakeToolchain(ADA))
    monkeypatch.setattr(tensorrt_backend, "load_engines", functools.partial(
        tensorrt_backend.load_engines, device="cpu", runtime=FakeRuntime(), device_info=ADA))
    assert main(_trt_args(tiny_dirs, tmp_path, "trt") + ["--tensorrt-precision", "fp32"]) == 0
    report = json.loads((tmp_path / "trt.json").read_text())
    trt = report["workloads"]["testbed"]["backends"]["tensorrt"]
    assert trt["status"] == "ok", trt.get("reason")
    assert trt["methods"]["hybridstitch-30"]["stage_counts"]["masked"] >= 1
    assert [b["ratio"] for b in trt["bound"]] == [0.3]
    manifest = read_manifest(str(tmp_path / "engines" / "testbed-64px-b2-tensorrt-fp32"))
    assert manifest.backend["name"] == "tensorrt" and manifest.precision == "fp32"


@pytest.mark.gpu
def test_tensorrt_column_on_gpu(tiny_dirs, tmp_path):
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        pytest.skip("needs TensorRT and a CUDA GPU (pip install hybridstitch[gpu] on an NVIDIA machine)")
    assert main(_trt_args(tiny_dirs, tmp_path, "trt")) == 0
    trt = json.loads((tmp_path / "trt.json").read_text())["workloads"]["testbed"]["backends"]["tensorrt"]
    assert trt["status"] == "ok", trt.get("reason")


def test_cached_methods_run_on_eager_only_and_stay_out_of_the_latency_model(tiny_dirs, tmp_path):
    """diffusers' cache hooks (hybridstitch.cachehooks) as latency methods: measured on eager torch, no model
    price (their cached calls are not run), kept out of the per-call latencies, skipped by the replayed workload."""
    out = tmp_path / "results"
    rc = main([
        "--testbed-large", tiny_dirs[0], "--testbed-small", tiny_dirs[1], "--testbed-size", "64", "--testbed-steps", "6",
        "--synthetic-scale", "64", "--synthetic-layers", "2", "1", "--synthetic-steps", "6", "--switch-steps", "2", "4",
        "--backends", "eager", "--synthetic-backends", "eager", "--reps", "1", "--out-dir", str(out), "--name", "cached",
        "--no-progress", "--no-plot", "--methods", "large,pab,taylorseer,hybridstitch-30+taylorseer",
    ])
    assert rc == 0
    report = json.loads((out / "cached.json").read_text())
    eager = report["workloads"]["testbed"]["backends"]["eager"]
    assert set(eager["methods"]) == {"large", "pab", "taylorseer", "hybridstitch-30+taylorseer"}
    assert eager["methods"]["pab"]["model"] is None and "no price" in eager["methods"]["pab"]["model_error"]
    assert eager["methods"]["pab"]["speedup"] > 0 and eager["methods"]["large"]["model"]["total_seconds"] > 0
    assert report["workloads"]["synthetic"]["methods"] == ["large"]
