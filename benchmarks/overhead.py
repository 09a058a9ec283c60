"""Time spent outside the engine calls: the runtime's own overhead, measured two ways.

The demo's setting on ONNX Runtime (the shipped testbed pair, 4 prompts, 20 steps, guidance
1.25, one thread, testbed-30 by default): the pipeline runs ``--reps`` times under cProfile, and

* ``profiler``: the share of the wall time not spent inside ``InferenceSession.run_with_iobinding``
  (the engine itself) -- what a profiler sees outside the engine calls;
* ``trace``: the share the run's own traces report as overhead (``overhead_seconds`` against the
  engine time the backends report, ``last_run_seconds``).

    python benchmarks/overhead.py [--method testbed-30] [--reps 5] [--out benchmarks/results/overhead]

Run from another checkout to measure that version (the script uses only the public API).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESCRIPTION = "The runtime's overhead outside the engine calls, by a profiler and by the traces."
PROMPTS = ("a handwritten 3", "a handwritten 7", "a handwritten 0", "a handwritten 5")  # the demo's


def engine_seconds(profile: cProfile.Profile) -> float:
    """Cumulative seconds inside ONNX Runtime's run calls."""
    stats = pstats.Stats(profile)
    total = 0.0
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        if name in ("run_with_iobinding", "run") and "onnxruntime" in filename:
            total += cumulative
    return total


def trace_share(traces) -> float:
    """The traces' overhead over overhead + engine time; a step's calls are shared by its images,
    so each step counts once (the longest image's record of it)."""
    steps = range(max(len(t.steps) for t in traces))
    at = [[t.steps[i] for t in traces if i < len(t.steps)] for i in steps]
    model = sum(max(sum(s.seconds.values()) for s in recs) for recs in at)
    overhead = sum(max(s.overhead_seconds for s in recs) for recs in at)
    return overhead / (overhead + model)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--method", default="testbed-30")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--engines", default=None, help="an exported testbed engine folder (default: export one)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "overhead"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from hybridstitch import HybridStitchPipeline
    from hybridstitch.export import ExportRequest, export_engines
    from hybridstitch.testbed import LARGE_DIR, SMALL_DIR

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.engines or os.path.join(tmp, "engines")
        if args.engines is None:
            export_engines(ExportRequest(large=LARGE_DIR, small=SMALL_DIR, height=32, width=32, batch=8,
                                         buckets=(0.1, 0.2, 0.3, 0.4)), folder, progress=False)
        pipe = HybridStitchPipeline.from_engines(folder, num_threads=1)
        kw = dict(prompt=list(PROMPTS), config=args.method, num_inference_steps=args.steps, guidance_scale=1.25,
                  output_type="latent", progress=False)
        pipe(generator=torch.Generator().manual_seed(0), **kw)  # warm-up
        rows = []
        for rep in range(args.reps):
            profile = cProfile.Profile()
            t0 = time.perf_counter()
            profile.enable()
            out = pipe(generator=torch.Generator().manual_seed(rep), **kw)
            profile.disable()
            wall = time.perf_counter() - t0
            engine = engine_seconds(profile)
            traces = out.traces if hasattr(out, "traces") else [out.trace]
            rows.append(dict(wall=wall, engine=engine, profiler_share=1 - engine / wall, trace_share=trace_share(traces)))
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    from hybridstitch.bench.machine import describe_machine, machine_info
    from hybridstitch.bench.report import write_report

    info = machine_info(1)
    result = dict(date=info["date"][:10], machine=describe_machine(info), method=args.method, reps=args.reps, rows=rows,
                  median=med)
    text = (f"{args.method} on ONNX Runtime, the demo's setting ({len(PROMPTS)} prompts, {args.steps} steps, guidance "
            f"1.25), {result['machine']}, {result['date']}, median of {args.reps} runs: wall {med['wall']:.3f} s, inside "
            f"the engine runs {med['engine']:.3f} s; outside the engine calls: {med['profiler_share']:.1%} (profiler), "
            f"{med['trace_share']:.1%} (the traces).")
    print(text)
    write_report(args.out, result, text)
    return result


if __name__ == "__main__":
    main()
