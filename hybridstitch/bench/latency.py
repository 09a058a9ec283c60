"""Latency benchmark: every method on every available backend, against the PyTorch baselines.

Two workloads (:mod:`.testbed`, :mod:`.synthetic`): the shipped trained pair through the real
pipeline, and SD3.5 Large / SD3 Medium-shaped random weights with a replayed schedule. Backends
(:mod:`.backends`): eager, compile, onnxruntime, tensorrt; one that cannot run here is reported
``n/a`` with the reason. Timing (:mod:`.timer`): one thread, a warm-up run of every method, then
``reps`` interleaved repetitions (rep 1: every backend and method, rep 2: ...); medians and
min-max; speed-ups over large-only on the same backend. Beside each measured latency: the
paper's latency model (Eqs. 3-8) from the per-call latencies t_l, t_s and t_l(r) measured in
the same runs, and the mask-ratio bound per bucket. Writes ``<out-dir>/<name>.json``, ``.md``
and ``.png`` (:mod:`.report`).

The command line is turned into a :class:`LatencySettings` at the edge
(:func:`settings_from_args`); everything below takes the typed settings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from dataclasses import dataclass, field

from hybridstitch.config import PRESETS, StitchConfig
from hybridstitch.errors import HybridStitchError
from hybridstitch.latency_model import (
    CallLatencies,
    LatencyBoundWarning,
    break_even_ratio,
    mask_ratio_bound,
    per_call_samples,
    predict_from_trace,
)

from .backends import (BACKENDS, DEFAULT_ENGINE_CACHE, TENSORRT_PRECISIONS, BackendUnavailable, WorkloadSettings, is_cached,
                       method_config)
from .synthetic import REAL_LAYERS, SyntheticSettings
from .testbed import TestbedSettings
from .timer import InterleavedTimer, WarmupBudgetExceeded, summary

# Read by argparse; a constant, not the module docstring, so ``python -OO`` (no docstrings) works.
DESCRIPTION = "Latency benchmark: every method on every available backend, against the PyTorch baselines."

DEFAULT_METHODS = (
    "large",
    "small",
    "t-stitch",
    "srdiffusion",
    "hybridstitch-10",
    "hybridstitch-20",
    "hybridstitch-30",
    "hybridstitch-40",
    "hybridstitch-30-static",
    "hybridstitch-30-fulllarge",
    "hybridstitch-30-10",
)
WORKLOADS = ("testbed", "synthetic")


@dataclass(frozen=True)
class LatencySettings:
    """One run of the latency benchmark."""

    common: WorkloadSettings = field(default_factory=lambda: WorkloadSettings(methods=DEFAULT_METHODS))
    testbed: TestbedSettings = field(default_factory=TestbedSettings)
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)
    workloads: tuple[str, ...] = WORKLOADS
    backends: tuple[str, ...] = BACKENDS  # of the testbed workload
    # torch.compile and the ONNX export of the 38-layer model take minutes on CPU
    synthetic_backends: tuple[str, ...] = ("eager", "tensorrt")
    reps: int = 3  # timed repetitions per method, interleaved
    compile_budget_s: float = 300.0  # give up on torch.compile after this much warm-up
    out_dir: str = os.path.join("benchmarks", "results")
    name: str = "latency_cpu"  # output file stem: <out_dir>/<name>.{json,md,png}
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.reps < 1:
            raise HybridStitchError("--reps must be >= 1")
        for what, given, known in (("workload", self.workloads, WORKLOADS), ("backend", self.backends, BACKENDS),
                                   ("backend", self.synthetic_backends, BACKENDS)):
            bad = [x for x in given if x not in known]
            if bad:
                raise HybridStitchError(f"unknown {what}(s) {', '.join(bad)}; choose from {', '.join(known)}")

    def backends_of(self, workload: str) -> tuple[str, ...]:
        return self.backends if workload == "testbed" else self.synthetic_backends


# -- measuring -----------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One timed run: end-to-end seconds and where they went."""

    seconds: float  # end to end, as the caller sees it
    model_seconds: float  # inside model calls
    loop_overhead_seconds: float  # in the loop, outside model calls: masks, merging, metric, scheduler
    outside_seconds: float  # outside the loop: inputs, prompt encoding, cache allocation, decoding
    switch_steps: list[int]
    stage_counts: dict[str, int]

    @classmethod
    def from_trace(cls, trace) -> "RunRecord":
        model = trace.model_seconds
        loop = sum(s.overhead_seconds for s in trace.steps)
        return cls(trace.total_seconds, model, loop, max(0.0, trace.total_seconds - model - loop),
                   list(trace.switch_steps), dict(trace.stage_counts))

    @property
    def overhead_share(self) -> float:
        """Share of the end-to-end time outside model calls (the runtime's overhead)."""
        return (self.seconds - self.model_seconds) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BackendResult:
    status: str = "ok"  # "ok" | "n/a"
    reason: str | None = None
    warmup_seconds: float = 0.0
    runs: dict[str, list[RunRecord]] = field(default_factory=dict)
    traces: dict[str, list] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.status, self.reason = "n/a", why


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _failure_reason(error: BaseException, phase: str) -> str:
    if isinstance(error, BackendUnavailable):
        return str(error)
    if isinstance(error, WarmupBudgetExceeded):
        return (f"torch.compile warm-up passed the {error.budget_s:g} s budget (--compile-budget-s) "
                f"after {error.elapsed_s:.0f} s")
    return f"failed in warm-up: {_error_line(error)}" if phase == "warm-up" else f"failed: {_error_line(error)}"


def measure_workload(workload, backends, reps: int, compile_budget_s: float, progress: bool = True) -> dict[str, BackendResult]:
    """Warm up every method on every backend, then ``reps`` interleaved timed repetitions.

    A backend that cannot be built, or fails in any run, is reported ``n/a`` with the reason;
    the others go on.
    """
    results: dict[str, BackendResult] = {}
    timer = InterleavedTimer(reps, warmup=1, drop_failures=True, progress=workload.name if progress else None)
    configs = [method_config(m) for m in workload.methods]
    supports = getattr(workload, "supports", lambda backend, name: True)
    for b in backends:
        results[b] = BackendResult()
        try:
            runner = workload.runner(b)
        except BackendUnavailable as e:
            results[b].fail(str(e))
            continue
        except Exception as e:  # a backend that fails to build is reported, not fatal
            results[b].fail(f"could not build: {_error_line(e)}")
            continue
        for c in (c for c in configs if supports(b, c.name)):  # cached methods: eager only
            timer.add((b, c.name), lambda r=runner, c=c: r(c, False), warmup_fn=lambda r=runner, c=c: r(c, True),
                      seconds_of=lambda trace: trace.total_seconds, group=b)
        if b == "compile":
            timer.budget(b, compile_budget_s)
    for (b, name), t in timer.run().items():
        res = results[b]
        if not t.ok:
            res.fail(_failure_reason(t.error, t.phase))
            continue
        res.warmup_seconds += t.warmup_seconds
        res.runs[name] = [RunRecord.from_trace(trace) for trace in t.results]
        res.traces[name] = list(t.results)
    return results


# -- summarising ---------------------------------------------------------------------------------------


def summarize_backend(result: BackendResult) -> dict:
    """Medians, speed-ups over large-only, per-call latencies, the latency model and the bound."""
    if result.status != "ok":
        return {"status": result.status, "reason": result.reason}
    # cached methods' calls are partly predicted, not run: they would bias the per-call latencies
    all_traces = [t for name, ts in result.traces.items() if not is_cached(name) for t in ts]
    samples = per_call_samples(all_traces, by="bucket")
    per_call = {
        "large": summary(samples["large"]) if samples["large"] else None,
        "small": summary(samples["small"]) if samples["small"] else None,
        "large_masked": {str(r): summary(v) for r, v in sorted(samples["large_masked"].items())},
    }
    lat = CallLatencies(
        per_call["large"]["median"] if per_call["large"] else None,
        per_call["small"]["median"] if per_call["small"] else None,
        {r: statistics.median(v) for r, v in samples["large_masked"].items()},
    )
    bound = []
    if lat.large is not None and lat.small is not None:
        for r, t in sorted(lat.masked.items()):
            bound.append({"ratio": r, "t_l_r": t, "t_l_r_over_t_l": t / lat.large, "t_l_r_plus_t_s": t + lat.small,
                          "t_l": lat.large, "holds": mask_ratio_bound(lat.large, lat.small, t)})
    base = result.runs.get("large")
    base_median = statistics.median(r.seconds for r in base) if base else None
    methods = {}
    for name, runs in result.runs.items():
        secs = [r.seconds for r in runs]
        med = statistics.median(secs)
        entry = {
            "seconds": summary(secs),
            "speedup": base_median / med if base_median else None,
            "switch_steps": runs[0].switch_steps,
            "switch_steps_vary": any(r.switch_steps != runs[0].switch_steps for r in runs),
            "stage_counts": runs[0].stage_counts,
            "overhead_share": statistics.median(r.overhead_share for r in runs),
            "loop_overhead_seconds": statistics.median(r.loop_overhead_seconds for r in runs),
            "outside_seconds": statistics.median(r.outside_seconds for r in runs),
            "model_seconds": statistics.median(r.model_seconds for r in runs),
        }
        if is_cached(name):
            entry["model"], entry["model_error"] = None, "the latency model has no price for a cached (predicted) call"
            methods[name] = entry
            continue
        try:
            pred = predict_from_trace(result.traces[name][0], lat, by="bucket")
            entry["model"] = pred.to_dict()
            entry["measured_over_model"] = med / pred.total_seconds if pred.total_seconds > 0 else None
        except HybridStitchError as e:
            entry["model"], entry["model_error"] = None, str(e)
        methods[name] = entry
    return {
        "status": "ok",
        "warmup_seconds": result.warmup_seconds,
        "per_call": per_call,
        "t_s_over_t_l": lat.small / lat.large if lat.large and lat.small else None,
        "break_even_ratio": break_even_ratio(lat.large, lat.small) if lat.large and lat.small else None,
        "bound": bound,
        "methods": methods,
    }


def add_eager_speedups(backends: dict) -> None:
    """Each method's speed-up over the PyTorch baseline: large-only on torch eager."""
    eager = backends.get("eager", {})
    base = (eager.get("methods") or {}).get("large") if eager.get("status") == "ok" else None
    for r in backends.values():
        for e in (r.get("methods") or {}).values():
            e["speedup_vs_eager_large"] = base["seconds"]["median"] / e["seconds"]["median"] if base else None


# -- the command ------------------------------------------------------------------------------------------


def _csv(choices, also=lambda x: False):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices and not also(x)]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``benchmarks/latency.py`` and ``hybridstitch bench``)."""
    p.add_argument("--workloads", type=_csv(WORKLOADS), default=list(WORKLOADS), help="comma list: testbed,synthetic")
    p.add_argument("--backends", type=_csv(BACKENDS), default=list(BACKENDS),
                   help="testbed backends, comma list of eager,compile,onnxruntime,tensorrt")
    p.add_argument("--synthetic-backends", type=_csv(BACKENDS), default=["eager", "tensorrt"],
                   help="synthetic backends (torch.compile / ONNX export of the 38-layer model take minutes on CPU)")
    p.add_argument("--methods", type=_csv(list(PRESETS), is_cached), default=list(DEFAULT_METHODS),
                   help="comma list of preset names, or cached methods (eager only: taylorseer, pab, fastercache, "
                        "<preset>+taylorseer)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per method (interleaved)")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=4.0, help="CFG scale (> 1: CFG batch 2)")
    g = p.add_argument_group("testbed")
    g.add_argument("--testbed-large", default=None, help="large folder (default: the shipped testbed)")
    g.add_argument("--testbed-small", default=None, help="small folder (default: the shipped testbed)")
    g.add_argument("--testbed-steps", type=int, default=28)
    g.add_argument("--testbed-size", type=int, default=None, help="height = width in pixels (default: the model's)")
    g.add_argument("--testbed-text-tokens", type=int, default=8, help="text tokens when the folders have no prompt encoder")
    g.add_argument("--prompt", default="a handwritten 3")
    g = p.add_argument_group("synthetic")
    g.add_argument("--synthetic-scale", type=float, default=16,
                   help="divide width, image tokens and text tokens of the real models by this (16: 152/96 wide, 144+21 tokens)")
    g.add_argument("--synthetic-layers", type=int, nargs=2, default=list(REAL_LAYERS), metavar=("LARGE", "SMALL"))
    g.add_argument("--synthetic-heads", type=int, nargs=2, default=[19, 12], metavar=("LARGE", "SMALL"))
    g.add_argument("--synthetic-steps", type=int, default=28)
    g.add_argument("--switch-steps", type=int, nargs=2, default=None, metavar=("S1", "S2"),
                   help="HybridStitch replay: large before S1, masked until S2, small after (default 30%%/70%% of the steps)")
    g.add_argument("--multi-switch-steps", type=int, nargs="+", default=None,
                   help="multi-mask replay: all n+1 switch steps (default: split S1..S2 evenly)")
    g.add_argument("--tstitch-switch", type=int, default=None, help="T-Stitch's first large step (default 40%% small)")
    g.add_argument("--srdiffusion-switch", type=int, default=None, help="SRDiffusion's first small step (default half)")
    p.add_argument("--compile-budget-s", type=float, default=300.0, help="give up on torch.compile after this much warm-up")
    p.add_argument("--tensorrt-precision", choices=TENSORRT_PRECISIONS, default="fp16",
                   help="precision of the TensorRT engines (ONNX Runtime engines are fp32, like the eager baseline)")
    p.add_argument("--engine-cache", default=DEFAULT_ENGINE_CACHE,
                   help="where exported engines (and saved synthetic models) are kept between runs")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--name", default="latency_cpu", help="output file stem: <out-dir>/<name>.{json,md,png}")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def settings_from_args(args: argparse.Namespace) -> LatencySettings:
    """The parsed command line as typed settings (the only place that reads the ``Namespace``)."""
    tuple_or_none = lambda xs: tuple(xs) if xs else None  # noqa: E731
    return LatencySettings(
        common=WorkloadSettings(methods=tuple(args.methods), seed=args.seed, guidance_scale=args.guidance_scale,
                                threads=args.threads, engine_cache=args.engine_cache,
                                tensorrt_precision=args.tensorrt_precision),
        testbed=TestbedSettings(large=args.testbed_large, small=args.testbed_small, steps=args.testbed_steps,
                                size=args.testbed_size, text_tokens=args.testbed_text_tokens, prompt=args.prompt),
        synthetic=SyntheticSettings(scale=args.synthetic_scale, layers=tuple(args.synthetic_layers),
                                    heads=tuple(args.synthetic_heads), steps=args.synthetic_steps,
                                    switch_steps=tuple_or_none(args.switch_steps),
                                    multi_switch_steps=tuple_or_none(args.multi_switch_steps),
                                    tstitch_switch=args.tstitch_switch, srdiffusion_switch=args.srdiffusion_switch),
        workloads=tuple(args.workloads), backends=tuple(args.backends), synthetic_backends=tuple(args.synthetic_backends),
        reps=args.reps, compile_budget_s=args.compile_budget_s, out_dir=args.out_dir, name=args.name,
        plot=not args.no_plot, progress=not args.no_progress,
    )


def _workload(name: str, settings: LatencySettings):
    if name == "testbed":
        from .testbed import TestbedWorkload

        return TestbedWorkload(settings.testbed, settings.common)
    from .synthetic import SyntheticWorkload

    return SyntheticWorkload(settings.synthetic, settings.common)


def run(settings: LatencySettings) -> dict:
    """Run the benchmark and write JSON, Markdown and the plot; returns the report."""
    import torch

    from .latency_render import render_markdown, render_plot
    from .machine import machine_info
    from .report import write_report

    threads = settings.common.threads
    torch.set_num_threads(threads)
    report: dict = {"meta": {**machine_info(threads), "reps": settings.reps, "command": " ".join(sys.argv)},
                    "workloads": {}}
    for wname in settings.workloads:
        try:
            workload = _workload(wname, settings)
        except BackendUnavailable as e:
            report["workloads"][wname] = {"status": "n/a", "reason": str(e)}
            print(f"{wname}: n/a ({e})", file=sys.stderr)
            continue
        with warnings.catch_warnings():  # the report evaluates the bound itself, per bucket
            warnings.simplefilter("ignore", LatencyBoundWarning)
            results = measure_workload(workload, settings.backends_of(wname), settings.reps, settings.compile_budget_s,
                                       progress=settings.progress)
        backends = {b: summarize_backend(r) for b, r in results.items()}
        add_eager_speedups(backends)
        report["workloads"][wname] = {"status": "ok", "description": workload.description,
                                      "methods": list(workload.methods), "backends": backends}
    md = render_markdown(report)
    png = render_plot(report) if settings.plot else None
    written = write_report(os.path.join(settings.out_dir, settings.name), report, md, png)
    print(md)
    print("wrote " + ", ".join(written))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridstitch bench", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(settings_from_args(args))
    except HybridStitchError as e:
        print(f"hybridstitch bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
