"""Thresholds across step counts (issue 16, point 3): the switch steps and the distance to large-only of
the testbed presets at several step counts, with Eq. 9's per-step ``d_i`` and with ``d_i`` per unit
of sigma (``difference="sigma"``).

The presets are calibrated at 20 steps. With more steps each step moves the estimate less, so a
per-step ``d_i`` falls below a fixed threshold earlier in the trajectory (at 1,000 steps testbed-30
leaves its large stage after step 2); per unit of sigma the threshold stays at one place on the
trajectory. For every step count: the mean switch steps, the same as a fraction of the steps and as
the sigma reached, the distance to large-only at that step count (same noise), and the modelled
speed-up (Eqs. 3-8 over per-call medians measured once).

    python benchmarks/step_counts.py                 # writes benchmarks/results/step_counts.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

from hybridstitch.bench.machine import describe_machine, machine_info
from hybridstitch.bench.report import write_report
from hybridstitch.config import StitchConfig
from hybridstitch.testbed.calibrate import (QualityReference, balanced_labels, initial_noise, load_testbed_pipeline,
                                            measure_call_latencies, modelled_seconds, sample)

METHODS = ("t-stitch", "testbed-30", "testbed-30-sigma", "testbed-30-refresh4", "testbed-30-refresh4-sigma")
DEFAULT_OUT = os.path.join("benchmarks", "results", "step_counts")


def switch_stats(traces, sigmas: list[float], steps: int) -> dict:
    """Mean switch steps, as a fraction of the steps, and the sigma at which each switch happened."""
    width = max((len(t.switch_steps) for t in traces), default=0)
    out = dict(switch_steps=[], switch_fraction=[], switch_sigma=[])
    for j in range(width):
        col = [t.switch_steps[j] if j < len(t.switch_steps) else steps for t in traces]
        out["switch_steps"].append(statistics.mean(col))
        out["switch_fraction"].append(statistics.mean(col) / steps)
        out["switch_sigma"].append(statistics.mean(sigmas[min(c, steps)] for c in col))
    return out


def run(step_counts, methods, samples: int, seed: int, guidance: float, out: str, long_steps: int, long_samples: int,
        long_methods) -> dict:
    from hybridstitch.sample import Timesteps

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pipe = load_testbed_pipeline()
    ref = QualityReference()
    ratios = sorted({r for m in methods for r in StitchConfig.preset(m).mask_ratios})
    lat = measure_call_latencies(pipe, samples, ratios, guidance, rounds=3)
    plan = [(t, samples, methods) for t in step_counts] + ([(long_steps, long_samples, long_methods)] if long_steps else [])
    rows = []
    for steps, n, names in plan:
        labels, noise = balanced_labels(n), initial_noise(n, seed)
        sigmas = [float(s) for s in Timesteps.of(pipe.scheduler, steps, "cpu").sigmas]
        large = sample(pipe, StitchConfig.preset("large"), labels, noise, steps, guidance, n)
        large_feats = ref.features(large.images)
        large_model = modelled_seconds(large.traces, lat, n)
        for name in names:
            res = sample(pipe, StitchConfig.preset(name), labels, noise, steps, guidance, n)
            q = ref.evaluate(res.images, labels, large.images, large_feats)
            row = dict(steps=steps, method=name, samples=n, **switch_stats(res.traces, sigmas, steps),
                       dist_to_large=q["feature_distance"], psnr=q["psnr"], accuracy=q["accuracy"],
                       speedup_modelled=large_model / modelled_seconds(res.traces, lat, n))
            rows.append(row)
            print(f"  {steps:>5} steps {name:<26} switch {[round(x, 1) for x in row['switch_steps']]} "
                  f"sigma {[round(x, 3) for x in row['switch_sigma']]} dist {row['dist_to_large']:.2f} "
                  f"speed-up {row['speedup_modelled']:.2f}x ({time.perf_counter() - t0:.0f}s)", flush=True)
    report = dict(date=datetime.date.today().isoformat(), machine=describe_machine(machine_info(1)),
                  command=" ".join(sys.argv), seed=seed, guidance_scale=guidance, per_call_seconds=lat.to_dict(),
                  presets={m: StitchConfig.preset(m).to_dict() for m in dict.fromkeys(list(methods) + list(long_methods))},
                  rows=rows, seconds=time.perf_counter() - t0)
    write_report(out, report, markdown(report))
    print("\n" + markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = ["# Switch steps across step counts\n",
             f"{report['date']}, {report['machine']}. Seed {report['seed']}, guidance {report['guidance_scale']}; distance "
             "to large-only at the same step count from the same noise; modelled speed-up (Eqs. 3-8). Presets: "
             + "; ".join(f"`{m}` thresholds {tuple(c['thresholds'])} ({c['difference']})" for m, c in report["presets"].items()
                         if c["method"] == "hybridstitch") + ".\n",
             "| steps | method | samples | switch steps | as a fraction of the steps | sigma at the switch | dist. to large | PSNR dB | speed-up (modelled) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        fmt = lambda xs, spec: ", ".join(format(x, spec) for x in xs) or "-"  # noqa: E731
        lines.append(f"| {r['steps']} | {r['method']} | {r['samples']} | {fmt(r['switch_steps'], '.1f')} | "
                     f"{fmt(r['switch_fraction'], '.2f')} | {fmt(r['switch_sigma'], '.3f')} | {r['dist_to_large']:.2f} | "
                     f"{r['psnr']:.1f} | {r['speedup_modelled']:.2f}x |")
    lines.append(f"\nTotal {report['seconds']:.0f} s.\n")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Switch steps and distance to large across step counts.")
    p.add_argument("--steps", type=_ints, default=(10, 20, 50, 100))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=1.25)
    p.add_argument("--long-steps", type=int, default=1000, help="one more, long step count (0: none)")
    p.add_argument("--long-samples", type=int, default=20)
    p.add_argument("--long-methods", default="testbed-30,testbed-30-sigma")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args(argv)
    run(a.steps, [m for m in a.methods.split(",") if m], a.samples, a.seed, a.guidance_scale, a.out, a.long_steps,
        a.long_samples, [m for m in a.long_methods.split(",") if m])
    return 0


if __name__ == "__main__":
    sys.exit(main())
