"""The runtime's own overhead: time outside the engine calls, timed around them and by the traces.

The demo's setting on ONNX Runtime (the shipped testbed pair, 4 prompts, 20 steps, guidance
1.25, one thread, testbed-30 by default). Each round runs the pipeline once and reports

* ``outside``: 1 - (seconds inside ONNX Runtime's session runs) / wall -- everything the call
  does besides running the engines (text encoding, noise, the method, binding, copies);
* ``trace``: the share the run's own traces report as overhead (``overhead_seconds`` against the
  engine time the backends report): the denoising loop alone.

    python benchmarks/overhead.py [--method testbed-30] [--reps 9] [--out benchmarks/results/overhead]
    python benchmarks/overhead.py --compare /path/to/other/checkout   # interleaved with another version

``--compare`` runs this script's rounds alternately in this checkout and in another one (with
that checkout's own Python: ``.venv/bin/python`` there), each on engines it exported itself, and
reports the two side by side (the other one first: "before").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESCRIPTION = "The runtime's overhead outside the engine calls, by a profiler and by the traces."
PROMPTS = ("a handwritten 3", "a handwritten 7", "a handwritten 0", "a handwritten 5")  # the demo's


class EngineClock:
    """Seconds inside ONNX Runtime's session runs, timed around ``InferenceSession.run`` and
    ``run_with_iobinding`` themselves (patched on the class: the same in any version of our code).

    ``hybridstitch.bench.ort_runs`` has the same clock (and :func:`load` its engine export) for the
    other benchmarks; this script keeps its own copies because ``--compare`` runs it inside older
    checkouts, whose package has no such module."""

    def __init__(self):
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        self.seconds = 0.0
        for name in ("run", "run_with_iobinding"):
            original = getattr(InferenceSession, name)

            def timed(*args, _original=original, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0

            setattr(InferenceSession, name, timed)


def trace_share(traces) -> float:
    """The traces' overhead over overhead + engine time; a step's calls are shared by its images,
    so each step counts once (the longest image's record of it)."""
    steps = range(max(len(t.steps) for t in traces))
    at = [[t.steps[i] for t in traces if i < len(t.steps)] for i in steps]
    model = sum(max(sum(s.seconds.values()) for s in recs) for recs in at)
    overhead = sum(max(s.overhead_seconds for s in recs) for recs in at)
    return overhead / (overhead + model)


def load(engines: str | None, tmp: str):
    from hybridstitch import HybridStitchPipeline
    from hybridstitch.export import ExportRequest, export_engines
    from hybridstitch.testbed import LARGE_DIR, SMALL_DIR

    folder = engines or os.path.join(tmp, "engines")
    if engines is None:
        export_engines(ExportRequest(large=LARGE_DIR, small=SMALL_DIR, height=32, width=32, batch=8,
                                     buckets=(0.1, 0.2, 0.3, 0.4)), folder, progress=False)
    return HybridStitchPipeline.from_engines(folder, num_threads=1)


def one_round(pipe, kw: dict, seed: int, clock: EngineClock) -> dict:
    """One run: its wall time, the seconds inside the engine runs, the traces' own account."""
    clock.seconds = 0.0
    t0 = time.perf_counter()
    out = pipe(generator=torch.Generator().manual_seed(seed), **kw)
    wall = time.perf_counter() - t0
    traces = out.traces if hasattr(out, "traces") else [out.trace]
    return dict(wall=wall, engine=clock.seconds, outside=1 - clock.seconds / wall, trace_share=trace_share(traces))


def worker(args) -> None:
    """Rounds on demand: one seed per stdin line, one JSON result per stdout line."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe, clock = load(args.engines, tmp), EngineClock()
        kw = request(args)
        pipe(generator=torch.Generator().manual_seed(0), **kw)  # warm-up
        print("ready", flush=True)
        for line in sys.stdin:
            print(json.dumps(one_round(pipe, kw, int(line), clock)), flush=True)


def request(args) -> dict:
    return dict(prompt=list(PROMPTS), config=args.method, num_inference_steps=args.steps, guidance_scale=1.25,
                output_type="latent", progress=False)


def compare(args) -> dict[str, list[dict]]:
    """Rounds alternately in the other checkout (before) and this one (after)."""
    here = os.path.abspath(__file__)
    cmd = ["--worker", "--method", args.method, "--steps", str(args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for name, root in (("before", os.path.abspath(args.compare)), ("after", REPO)):
        python = os.path.join(root, ".venv", "bin", "python")
        procs[name] = subprocess.Popen([python if os.path.exists(python) else sys.executable, here, *cmd], cwd=root,
                                       env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if procs[name].stdout.readline().strip() != "ready":
            raise SystemExit(f"the {name} worker ({root}) failed to start")
    rows = {name: [] for name in procs}
    try:
        for rep in range(args.reps):
            for name, proc in procs.items():
                proc.stdin.write(f"{rep}\n")
                proc.stdin.flush()
                rows[name].append(json.loads(proc.stdout.readline()))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--method", default="testbed-30")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--engines", default=None, help="an exported testbed engine folder (default: export one)")
    ap.add_argument("--compare", default=None, help="another checkout to run interleaved with this one (before)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "overhead"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        return worker(args)
    if args.compare:
        runs = compare(args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pipe, clock = load(args.engines, tmp), EngineClock()
            kw = request(args)
            pipe(generator=torch.Generator().manual_seed(0), **kw)  # warm-up
            runs = {"this checkout": [one_round(pipe, kw, rep, clock) for rep in range(args.reps)]}
    from hybridstitch.bench.machine import describe_machine, machine_info
    from hybridstitch.bench.report import write_report

    info = machine_info(1)
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in runs.items()}
    result = dict(date=info["date"][:10], machine=describe_machine(info), method=args.method, reps=args.reps,
                  steps=args.steps, prompts=len(PROMPTS), runs=runs, median=med)
    lines = [f"{args.method} on ONNX Runtime, the demo's setting ({len(PROMPTS)} prompts, {args.steps} steps, guidance "
             f"1.25), one thread, {result['machine']}, {result['date']}; median of {args.reps} interleaved rounds.", "",
             "| version | wall (s) | in the engine runs (s) | outside the engine runs | traces' overhead |",
             "|---|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['wall']:.3f} | {m['engine']:.3f} | {m['outside']:.1%} | "
                     f"{m['trace_share']:.1%} |")
    if len(med) == 2:
        before, after = med.values()
        lines += ["", f"wall after/before: {after['wall'] / before['wall']:.3f}; "
                      f"engine after/before: {after['engine'] / before['engine']:.3f}"]
    text = "\n".join(lines)
    print(text)
    write_report(args.out, result, text)
    return result


if __name__ == "__main__":
    main()
