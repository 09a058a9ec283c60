"""Load test of ``hybridstitch serve`` on loopback: a fixed number of requests at each concurrency.

Starts the server (Triton Inference Server as ``nvidia-pytriton`` bundles it) on free loopback
ports over the given engines -- by default the shipped testbed's ONNX Runtime engines, exported
here -- or loads an already running server (``--url``). Each concurrency level sends the same
requests (seed i, prompt i), closed loop: ``c`` clients, each sending its next request when the
previous one returns. Levels are interleaved (:mod:`hybridstitch.bench.timer`: every round runs
every level, every second round in reverse order) with a direct reference: the same requests
called one after another on the pipeline in this process, no server.

Per level: p50/p95 latency, images/s, errors, and the batches Triton formed (its statistics API,
counted around each level) with Triton's mean queue time per request.

    python benchmarks/serving.py [--concurrency 1 2 4 8] [--requests 16] [--rounds 3] [--out benchmarks/results/serving]
    python benchmarks/serving.py --engines TRT_ENGINES --method hybridstitch-30 --steps 28 --guidance-scale 7 \\
        --prompt "a photo of a cat" --prompt "a red car"     # TensorRT engines on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

from hybridstitch.bench.machine import describe_machine, machine_info
from hybridstitch.bench.report import write_report
from hybridstitch.bench.timer import InterleavedTimer, ratio_summary, summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# argparse reads this, not __doc__ (None under python -OO)
DESCRIPTION = "Load test of hybridstitch serve on loopback: a fixed number of requests at each concurrency."
TESTBED_PROMPTS = tuple(f"a handwritten {d}" for d in range(10))


@dataclass(frozen=True)
class Workload:
    prompts: tuple[str, ...]
    requests: int
    method: str
    steps: int
    guidance_scale: float

    def request(self, i: int) -> dict:
        return dict(prompt=self.prompts[i % len(self.prompts)], seed=i, method=self.method, steps=self.steps,
                    guidance_scale=self.guidance_scale)


@dataclass
class LevelRun:
    """One closed-loop run of every request at one concurrency."""

    latencies: list[float]
    errors: list[str]
    wall_s: float
    batches: dict[int, int]  # batch size -> batches Triton ran during this run
    queue_ms: float | None  # Triton's mean queue time per request during this run


def triton_counts(client) -> tuple[dict[int, int], int, int]:
    """(batch size -> count, requests queued, queue nanoseconds) from Triton's statistics."""
    from hybridstitch.serve.client import batch_sizes

    stats = client.statistics()
    queue = stats["model_stats"][0]["inference_stats"]["queue"]
    return batch_sizes(stats), int(queue["count"]), int(queue["ns"])


def run_level(url: str, workload: Workload, concurrency: int, count: int | None = None) -> LevelRun:
    from hybridstitch import HybridStitchError
    from hybridstitch.serve.client import HybridStitchClient

    todo = iter(range(count if count is not None else workload.requests))
    lock = threading.Lock()
    latencies, errors = [], []
    clients = [HybridStitchClient(url, timeout_s=600) for _ in range(concurrency)]  # connected before the clock runs
    start = threading.Barrier(concurrency + 1)

    def worker(client):
        start.wait()
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                client.generate(**workload.request(i))
            except HybridStitchError as e:
                errors.append(str(e))
            else:
                latencies.append(time.perf_counter() - t0)

    with HybridStitchClient(url) as stats_client:
        before = triton_counts(stats_client)
        threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = triton_counts(stats_client)
    for c in clients:
        c.close()
    batches = {size: n - before[0].get(size, 0) for size, n in after[0].items() if n - before[0].get(size, 0)}
    queued = after[1] - before[1]
    return LevelRun(latencies, errors, wall, batches, (after[2] - before[2]) / queued / 1e6 if queued else None)


def run_direct(pipe, workload: Workload) -> LevelRun:
    """The same requests one after another on the pipeline in this process: no server."""
    from hybridstitch.serve.runner import GenerationRequest, generate_one

    latencies = []
    t0 = time.perf_counter()
    for i in range(workload.requests):
        t = time.perf_counter()
        generate_one(pipe, GenerationRequest(**workload.request(i)))
        latencies.append(time.perf_counter() - t)
    return LevelRun(latencies, [], time.perf_counter() - t0, {}, None)


def export_testbed(folder: str) -> str:
    from hybridstitch.demo import testbed_image_size
    from hybridstitch.export import ExportRequest, export_engines
    from hybridstitch.testbed import LARGE_DIR, SMALL_DIR

    size = testbed_image_size()
    export_engines(ExportRequest(large=LARGE_DIR, small=SMALL_DIR, height=size, width=size, batch=2, buckets=(0.3,),
                                 precision="fp32"), folder, progress=False)
    return folder


def rates(runs: list[LevelRun]) -> list[float]:
    return [len(r.latencies) / r.wall_s for r in runs]


def level_row(label: str, runs: list[LevelRun], base: list[LevelRun] | None) -> dict:
    """One table row; ``base``: the runs of the first concurrency level, for per-round throughput ratios."""
    latencies = [x for r in runs for x in r.latencies]
    ok, wall = len(latencies), sum(r.wall_s for r in runs)
    batches: dict[int, int] = {}
    for r in runs:
        for size, n in r.batches.items():
            batches[size] = batches.get(size, 0) + n
    queue = [r.queue_ms for r in runs if r.queue_ms is not None]
    return {
        "level": label, "requests": ok + sum(len(r.errors) for r in runs), "errors": sum(len(r.errors) for r in runs),
        "error_samples": sorted({e for r in runs for e in r.errors})[:3],
        "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "p95_s": float(np.percentile(latencies, 95)) if latencies else None,
        "images_per_s": ok / wall if wall else None, "images_per_s_rounds": summary(rates(runs)),
        # per round, then the median: a slow phase of the shared machine hits both levels of a round alike
        "vs_c1": ratio_summary(rates(runs), rates(base)) if base is not None else None,
        "batches": dict(sorted(batches.items())),
        "mean_batch": (sum(s * n for s, n in batches.items()) / sum(batches.values())) if batches else None,
        "triton_queue_ms": float(np.mean(queue)) if queue else None,
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Serving: `hybridstitch serve` under load on loopback",
        "",
        f"{report['machine']['date']}, {describe_machine(report['machine'])}. **{report['where']}**; runner: "
        f"**{report['runner']}**. Triton {report['triton']}; max batch size {s['max_batch_size']}, max queue delay "
        f"{s['max_queue_delay_ms']:g} ms, {s['instances']} instance(s). Workload: {s['requests']} requests per level "
        f"(seed i, {s['prompts']}), {s['method']}, {s['steps']} steps, guidance {s['guidance_scale']:g}; closed loop, "
        f"{s['rounds']} interleaved rounds (pooled). Images/s over all rounds (median, min-max over rounds).",
        "",
        "| level | requests | errors | p50 s | p95 s | images/s | vs c=1 | batches Triton formed (size: count) | mean batch | Triton queue ms/request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    for row in report["levels"]:
        r, v = row["images_per_s_rounds"], row["vs_c1"]
        vs = "-" if v is None else f"{v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f})"
        lines.append(
            f"| {row['level']} | {row['requests']} | {row['errors']} | {f(row['p50_s'])} | {f(row['p95_s'])} | "
            f"{f(row['images_per_s'], '{:.2f}')} ({r['min']:.2f}-{r['max']:.2f}) | {vs} | "
            f"{', '.join(f'{k}: {v}' for k, v in row['batches'].items()) or '-'} | {f(row['mean_batch'], '{:.2f}')} | "
            f"{f(row['triton_queue_ms'], '{:.1f}')} |"
        )
    lines += ["", *report["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--engines", default=None, help="engine folder to serve (default: the testbed's, exported here)")
    p.add_argument("--url", default=None, help="load a running server instead of starting one (no direct reference)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=16, help="requests per level per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", action="append", default=None, help="prompts, used in turn (default: the testbed's digits)")
    p.add_argument("--method", default="testbed-30")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=1.25)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--max-queue-delay-ms", type=float, default=10.0)
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the model instance and the direct reference")
    p.add_argument("--no-direct", action="store_true", help="skip the in-process reference")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "serving"))
    args = p.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < max(args.concurrency) or args.rounds < 1:
        p.error("concurrency levels must be >= 1, --requests at least the largest level, --rounds >= 1")
    return args


def measure(args, workload: Workload) -> dict:
    """Start the server (unless --url), then the interleaved rounds; the server is stopped whatever happens."""
    from hybridstitch.serve.server import TritonServer
    from hybridstitch.serve.settings import ModelSettings, ServerSettings

    with tempfile.TemporaryDirectory(prefix="hybridstitch-serving-bench-") as scratch:
        engines = args.engines or (None if args.url else export_testbed(os.path.join(scratch, "engines")))
        triton = None
        try:
            url = args.url
            if url is None:
                model = ModelSettings(engines=engines, threads=args.threads, max_inflight=args.max_batch_size,
                                      method=args.method, steps=args.steps, guidance_scale=args.guidance_scale)
                triton = TritonServer(model, ServerSettings(
                    http_port=0, grpc_port=0, metrics_port=0, max_batch_size=args.max_batch_size,
                    max_queue_delay_ms=args.max_queue_delay_ms, instances=args.instances))
                t0 = time.perf_counter()
                url = triton.start().http_url
                print(f"server ready at {url} after {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            timer = InterleavedTimer(reps=args.rounds, warmup=1, alternate=True, progress="serving")
            if engines is not None and not args.no_direct:
                from hybridstitch import HybridStitchPipeline

                pipe = HybridStitchPipeline.from_engines(engines, num_threads=args.threads)
                warm = Workload(workload.prompts, 2, workload.method, workload.steps, workload.guidance_scale)
                timer.add("direct", lambda: run_direct(pipe, workload), warmup_fn=lambda: run_direct(pipe, warm))
            for c in args.concurrency:
                timer.add(f"c={c}", lambda c=c: run_level(url, workload, c),
                          warmup_fn=lambda c=c: run_level(url, workload, c, count=c))
            return timer.run()
        finally:
            if triton is not None:
                triton.stop()


def build_report(args, timings: dict) -> dict:
    import torch

    first = timings[f"c={args.concurrency[0]}"].results
    rows = [level_row(str(key), t.results, first if str(key).startswith("c=") else None) for key, t in timings.items()]
    notes = []
    if "direct" in timings:
        # Per round: mean latency through the server at the first level over the direct call's.
        over = ratio_summary([float(np.mean(r.latencies)) for r in first],
                             [float(np.mean(r.latencies)) for r in timings["direct"].results])
        notes.append(f"- Serving overhead at c={args.concurrency[0]}: mean latency through the server / direct = "
                     f"{over['median']:.3f} ({over['min']:.3f}-{over['max']:.3f} over rounds).")
    return {
        "machine": machine_info(args.threads),
        "where": "GPU" if torch.cuda.is_available() else "CPU (shared cores)",
        "runner": runner_label(),
        "triton": "2.51 (bundled by nvidia-pytriton 0.7.0)" if args.url is None else "as running at " + args.url,
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "prompt")},
                     "prompts": "the testbed's digits" if args.prompt is None else list(args.prompt)},
        "levels": rows,
        "notes": notes + [
            "- `direct`: the same requests called one after another on the pipeline in this process (no server, no HTTP).",
            "- `vs c=1`: images/s relative to the first concurrency level, per round (median, min-max). The batching "
            "runner runs the requests an instance holds together, one step at a time (each engine once per step over "
            "the images that need it); a CPU call already scales with its batch, so the gain is the per-call cost saved.",
            "- Batches: Triton's dynamic batcher hands the model up to max-batch-size requests at once; the model holds "
            "at most that many in its runner, so further requests wait in Triton's queue (the queue column).",
        ],
    }


def runner_label() -> str:
    """The runner the served model uses (``hybridstitch.serve.runner.open_runner``), by its docstring."""
    from hybridstitch.serve import runner

    cls = runner.RUNNER
    return f"{cls.__name__} ({(cls.__doc__ or '').strip().splitlines()[0].rstrip('.')})"


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    workload = Workload(tuple(args.prompt or TESTBED_PROMPTS), args.requests, args.method, args.steps, args.guidance_scale)
    report = build_report(args, measure(args, workload))
    written = write_report(args.out, report, markdown(report))
    print(markdown(report))
    print("wrote " + ", ".join(written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
