"""Continuous (step-level) batching on CPU: requests/s at 1, 2, 4 and 8 concurrent requests.

The shipped testbed pair on ONNX Runtime (one thread), requests of mixed presets and step counts
(testbed-30 at 20 steps, testbed-10 at 16, testbed-40 at 24, SRDiffusion at 20, cycled), each
one image with guidance 1.25. For each concurrency c, every round runs the same c requests

* ``one after another``: ``pipe(...)`` per request, in turn;
* ``StepScheduler``: all c submitted at once, the steps run until idle (:mod:`hybridstitch.scheduler`);

interleaved, and checks that every request's latents are the same both ways (relative L2 <= 1e-5).
Reported: requests/s both ways and their ratio, the engine calls both ways, and per scheduler tick
the engine calls and images in flight.

    python benchmarks/scheduler.py [--levels 1,2,4,8] [--reps 3] [--out benchmarks/results/scheduler]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESCRIPTION = "Requests/s of the step-level scheduler vs requests one after another (testbed, ONNX Runtime, CPU)."
MIX = (("testbed-30", 20), ("testbed-10", 16), ("testbed-40", 24), ("testbed-srdiffusion", 20))


def requests(c: int) -> list[dict]:
    from hybridstitch.testbed.data import prompt_for

    out = []
    for i in range(c):
        preset, steps = MIX[i % len(MIX)]
        out.append(dict(prompt=prompt_for(i % 10), config=preset, num_inference_steps=steps, guidance_scale=1.25,
                        generator=torch.Generator().manual_seed(100 + i), output_type="latent", progress=False))
    return out


def fresh(reqs: list[dict]) -> list[dict]:
    """The requests with their generators reset (each run draws the same noise)."""
    return [dict(r, generator=torch.Generator().manual_seed(r["generator"].initial_seed())) for r in reqs]


def run_sequential(pipe, reqs, counter) -> tuple[float, int, list]:
    counter.reset()
    t0 = time.perf_counter()
    outs = [pipe(**r).images for r in fresh(reqs)]
    return time.perf_counter() - t0, counter.calls, outs


def run_scheduled(pipe, reqs, counter) -> tuple[float, int, list, dict]:
    from hybridstitch.scheduler import StepScheduler

    counter.reset()
    scheduler = StepScheduler(pipe, max_samples=8)
    t0 = time.perf_counter()
    futures = [scheduler.submit(**r) for r in fresh(reqs)]
    scheduler.run_until_idle()
    outs = [f.result().images for f in futures]
    seconds = time.perf_counter() - t0
    stats = scheduler.stats
    return seconds, counter.calls, outs, dict(ticks=stats.ticks, engine_calls=stats.engine_calls,
                                              images_per_tick=statistics.mean(stats.samples_per_tick))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "scheduler"))
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    torch.set_num_threads(1)
    from hybridstitch import HybridStitchPipeline
    from hybridstitch.bench.machine import describe_machine, machine_info
    from hybridstitch.bench.report import write_report
    from hybridstitch.bench.ort_runs import OrtRuns, export_testbed_engines

    with tempfile.TemporaryDirectory() as tmp:
        pipe = HybridStitchPipeline.from_engines(export_testbed_engines(os.path.join(tmp, "engines")), num_threads=1)
        counter = OrtRuns()
        run_sequential(pipe, requests(2), counter)  # warm-up
        rows = {c: [] for c in levels}
        for rep in range(args.reps):
            for c in levels:
                reqs = requests(c)
                seq_s, seq_calls, seq_out = run_sequential(pipe, reqs, counter)
                sch_s, sch_calls, sch_out, stats = run_scheduled(pipe, reqs, counter)
                worst = max(float((a - b).norm() / b.norm()) for a, b in zip(sch_out, seq_out))
                if worst > 1e-5:
                    raise SystemExit(f"c={c}: a scheduled request differs from the same request alone ({worst:.2e})")
                rows[c].append(dict(sequential_s=seq_s, scheduled_s=sch_s, sequential_calls=seq_calls,
                                    scheduled_calls=sch_calls, worst_rel_l2=worst, **stats))
                print(f"round {rep + 1}/{args.reps} c={c}: one after another {seq_s:.2f} s ({seq_calls} calls), "
                      f"scheduler {sch_s:.2f} s ({sch_calls} calls)", flush=True)
    info = machine_info(1)
    summary = {}
    for c, rs in rows.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        summary[c] = dict(sequential_rps=c / med("sequential_s"), scheduled_rps=c / med("scheduled_s"),
                          speedup=statistics.median(r["sequential_s"] / r["scheduled_s"] for r in rs),
                          sequential_calls=rs[0]["sequential_calls"], scheduled_calls=rs[0]["scheduled_calls"],
                          calls_per_tick=rs[0]["engine_calls"] / rs[0]["ticks"], ticks=rs[0]["ticks"],
                          images_per_tick=rs[0]["images_per_tick"], worst_rel_l2=max(r["worst_rel_l2"] for r in rs))
    result = dict(date=info["date"][:10], machine=describe_machine(info), reps=args.reps, mix=MIX, rounds=rows,
                  summary=summary)
    lines = [f"Step-level batching, testbed on ONNX Runtime (1 thread), {result['machine']}, {result['date']}; "
             f"requests cycle {', '.join(f'{p} x {s} steps' for p, s in MIX)}, 1 image each, guidance 1.25; "
             f"median of {args.reps} interleaved rounds.", "",
             "| concurrent requests | one after another (req/s) | StepScheduler (req/s) | speed-up | engine calls "
             "(one after another / scheduler) | scheduler ticks | engine calls per tick | images per tick | "
             "worst rel. L2 vs alone |", "|---|---|---|---|---|---|---|---|---|"]
    for c, s in summary.items():
        lines.append(f"| {c} | {s['sequential_rps']:.2f} | {s['scheduled_rps']:.2f} | {s['speedup']:.2f}x | "
                     f"{s['sequential_calls']} / {s['scheduled_calls']} | {s['ticks']} | {s['calls_per_tick']:.2f} | "
                     f"{s['images_per_tick']:.2f} | {s['worst_rel_l2']:.1e} |")
    text = "\n".join(lines)
    print(text)
    write_report(args.out, result, text)
    return result


if __name__ == "__main__":
    main()
