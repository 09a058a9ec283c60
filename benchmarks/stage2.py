"""Stage-2 concurrency on CPU: the small call beside the masked large call, in a second thread.

A masked step's small call and masked-large call are independent (the small model reads the
latents, the large one its cache); ``HybridStitchPipeline(..., concurrent_stage2=True)`` runs the
small one in a second thread. Three set-ups of the same engines, timed in interleaved rounds
(the demo's setting: the shipped testbed pair on ONNX Runtime, 4 prompts, guidance 1.25):

* ``sequential, 1 thread``: the default; every call in turn, one ONNX Runtime thread;
* ``concurrent, 1 thread each``: the two calls of a masked step at once, one thread each;
* ``sequential, 2 threads``: every call in turn, two intra-op threads -- the same two cores spent
  inside each call instead.

Every set-up must give the same images (checked). Reported: wall time per call and the ratios
to the default, per round. The gain needs two free cores; on a shared machine it is bounded by
what the other jobs leave.

    python benchmarks/stage2.py [--method testbed-30] [--steps 20] [--reps 7] [--out benchmarks/results/stage2]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESCRIPTION = "Stage-2 concurrency: the small call in a second thread beside the masked large call (CPU, testbed)."
SETUPS = {  # name -> (concurrent_stage2, ONNX Runtime threads per session)
    "sequential, 1 thread": (False, 1),
    "concurrent, 1 thread each": (True, 1),
    "sequential, 2 threads": (False, 2),
}


def main(argv=None) -> dict:
    from hybridstitch import HybridStitchPipeline
    from hybridstitch.bench.machine import describe_machine, machine_info
    from hybridstitch.bench.report import write_report
    from hybridstitch.bench.timer import InterleavedTimer, ratio_summary, summary
    from hybridstitch.bench.ort_runs import export_testbed_engines

    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--method", default="testbed-30")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "stage2"))
    args = ap.parse_args(argv)

    kw = dict(prompt=[f"a handwritten {d}" for d in range(4)], config=args.method,
              num_inference_steps=args.steps, guidance_scale=1.25, output_type="latent", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_testbed_engines(os.path.join(tmp, "engines"))
        pipes = {name: HybridStitchPipeline.from_engines(folder, num_threads=threads, concurrent_stage2=conc)
                 for name, (conc, threads) in SETUPS.items()}
        timer = InterleavedTimer(reps=args.reps, warmup=1, alternate=True, progress="stage2")
        for name, pipe in pipes.items():
            timer.add(name, lambda pipe=pipe: pipe(generator=torch.Generator().manual_seed(0), **kw).images)
        timings = timer.run()

    reference = timings["sequential, 1 thread"]
    rows = []
    for name, t in timings.items():
        same = all(torch.equal(a, b) for a, b in zip(t.results, reference.results, strict=True))
        rows.append(dict(setup=name, seconds=summary(t.seconds), vs_default=ratio_summary(t.seconds, reference.seconds),
                         same_images=same))
    data = dict(machine=machine_info(threads=1), method=args.method, steps=args.steps, prompts=4, guidance_scale=1.25,
                reps=args.reps, rows=rows)
    md = [f"# Stage-2 concurrency ({args.method}, {args.steps} steps, 4 prompts, guidance 1.25)", "",
          describe_machine(data["machine"]) + f"; median of {args.reps} interleaved rounds.", "",
          "| set-up | wall per call (s) | vs sequential, 1 thread | same images |", "|---|---|---|---|"]
    for r in rows:
        s, v = r["seconds"], r["vs_default"]
        md.append(f"| {r['setup']} | {s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) | "
                  f"{v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f}) | {'yes' if r['same_images'] else 'NO'} |")
    text = "\n".join(md) + "\n"
    print(text)
    write_report(args.out, data, text)
    return data


if __name__ == "__main__":
    main()
