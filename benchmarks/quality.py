"""The shape of the paper's Tables 1-3 and Figure 7 on the trained testbed: quality vs latency,
with the cache-freshness variants, diffusers' cache hooks and their combination (issue 16).

Every method samples the same prompts from the same noise per seed (digits 0-9 equally), so
the distance to large-only is paired. Columns: FD against all 1,797 real digits in classifier
features (mean +- std over seeds, and of all seeds' samples pooled), prompt accuracy, distance
to large-only (mean L2 of paired classifier features, the LPIPS analogue, and PSNR, with their
spread over seeds), latency (measured wall time of the sampling, and the latency model Eqs. 3-8
over per-call medians measured at the start, interleaved), speed-ups over large-only, mean switch
steps and refresh steps. The real-vs-real FD floor at the same sample sizes is reported beside
the table. Records, table and plot: :mod:`hybridstitch.testbed.quality_report`.

    python benchmarks/quality.py                       # writes benchmarks/results/quality.{json,md,png}
    python benchmarks/quality.py --methods large,small,testbed-30,pab --seeds 0 --samples-per-seed 100
    python benchmarks/quality.py --render              # the table and plot again from quality.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from hybridstitch import cachehooks
from hybridstitch.bench.machine import describe_machine, machine_info
from hybridstitch.bench.report import write_report
from hybridstitch.config import PRESETS, StitchConfig
from hybridstitch.errors import HybridStitchError
from hybridstitch.testbed.calibrate import (
    QualityReference,
    balanced_labels,
    initial_noise,
    load_testbed_pipeline,
    mean_stage_counts,
    mean_switch_steps,
    measure_call_latencies,
    modelled_seconds,
    sample,
)
from hybridstitch.testbed.quality_report import markdown, pareto_front, plot, refreshes_per_image, row_record

# (row label, preset or cached method, the paper's table it mirrors or the row's family: quality_report.FAMILIES)
ROWS = (
    ("large", "large", "1"),
    ("small", "small", "1"),
    ("t-stitch", "t-stitch", "1"),
    ("srdiffusion", "testbed-srdiffusion", "1"),
    ("hybridstitch-10", "testbed-10", "1"),
    ("hybridstitch-20", "testbed-20", "1"),
    ("hybridstitch-30", "testbed-30", "1"),
    ("hybridstitch-40", "testbed-40", "1"),
    ("staticmask-30", "testbed-30-static", "2"),
    ("fulllarge-30", "testbed-30-fulllarge", "2"),
    ("hybridstitch-20-10", "testbed-20-10", "3"),
    ("hybridstitch-30-10", "testbed-30-10", "3"),
    ("hybridstitch-40-30", "testbed-40-30", "3"),
    ("hybridstitch-30 (paper thresholds)", "hybridstitch-30", "1"),
    ("refresh-every-4", "testbed-30-refresh4", "fresh"),
    ("refresh-every-2", "testbed-30-refresh2", "fresh"),
    ("refresh-age-3", "testbed-30-refreshage", "fresh"),
    ("refresh-share-30", "testbed-30-share", "fresh"),
    ("age-weight-0.1", "testbed-30-ageweight", "fresh"),
    ("hybridstitch-30 (per-sigma)", "testbed-30-sigma", "sigma"),
    ("taylorseer", "taylorseer", "hook"),
    ("taylorseer-blocks", "taylorseer-blocks", "hook"),
    ("pab", "pab", "hook"),
    ("fastercache", "fastercache", "hook"),
    ("hybridstitch-10+taylorseer", "testbed-10+taylorseer", "combo"),
)
DEFAULT_OUT = os.path.join("benchmarks", "results", "quality")
# Read by argparse; a constant, not the module docstring, so ``python -OO`` (no docstrings) works.
DESCRIPTION = "The shape of the paper's Tables 1-3 and Figure 7 on the trained testbed: quality vs latency."


@dataclass(frozen=True)
class QualitySettings:
    """One run of the quality benchmark (the command line, typed at the edge by :func:`settings_from_args`)."""

    samples_per_seed: int = 250  # per seed and row, digits 0-9 equally
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 20
    guidance_scale: float = 1.25
    methods: str | None = None  # comma-separated row labels or presets (None: every row)
    ablation_seeds: int | None = None  # rows beyond Table 1's main comparison on the first N seeds (None: all)
    batch_size: int = 125  # prompts per pipeline call (CFG doubles it)
    threads: int = 1
    latency_rounds: int = 5
    out: str = DEFAULT_OUT  # output path without extension
    note: str = ""  # why the run differs from the defaults (e.g. fewer samples on a loaded machine): JSON and table

    def __post_init__(self) -> None:
        if self.samples_per_seed < 2:
            raise HybridStitchError("--samples-per-seed must be >= 2 (FD needs two samples)")
        if not self.seeds:
            raise HybridStitchError("--seeds must name at least one seed, e.g. --seeds 0")
        if self.ablation_seeds is None:  # frozen: set through object.__setattr__ in __post_init__ only
            object.__setattr__(self, "ablation_seeds", len(self.seeds))


def resolve_methods(text: str | None) -> list[tuple[str, str, str]]:
    """The rows to run: all of :data:`ROWS`, or the comma-separated row labels / preset names given.
    Large-only always runs first (the other rows' distances are to its samples)."""
    if not text:
        rows = list(ROWS)
    else:
        by_label = {r[0]: r for r in ROWS}
        by_preset = {r[1]: r for r in ROWS}
        rows = []
        for name in (x.strip() for x in text.split(",") if x.strip()):
            if name in by_label or name in by_preset:  # row labels first: "hybridstitch-30" is testbed-30's row
                rows.append(by_label.get(name) or by_preset[name])
            elif name in PRESETS or cachehooks.is_method(name):
                rows.append((name, name, "-"))
            else:
                raise HybridStitchError(f"unknown method {name!r}; use a row label ({', '.join(r[0] for r in ROWS)}) or a preset")
    rows = [r for r in rows if r[1] != "large"]
    missing = [p for _, p, _ in rows if preset_of(p) not in PRESETS]
    if missing:
        raise HybridStitchError(f"preset(s) {', '.join(missing)} missing from hybridstitch.config.PRESETS; "
                                "run `hybridstitch calibrate` and add the testbed presets first")
    return [ROWS[0]] + rows


def preset_of(name: str) -> str:
    """The preset a row runs: its own name, or a cached method's (``cachehooks``)."""
    return name if name in PRESETS or not cachehooks.is_method(name) else cachehooks.method(name).preset


def pipelines(pipe, rows) -> dict:
    """The pipeline of each row: ``pipe``, or for a cached method ``pipe`` with diffusers' hooks attached."""
    return {label: cachehooks.hooked_pipeline(pipe, preset) if preset not in PRESETS else pipe for label, preset, _ in rows}


def real_floors(ref: QualityReference, sizes, seeds) -> dict:
    """Real-vs-real FD at each sample size ``n``: (a) two disjoint sets of n real digits
    (:func:`~hybridstitch.testbed.quality.real_fd_floor`), (b) n real digits drawn without
    replacement from the 1,797 against all 1,797 (the exact analogue of a row's FD, but the
    sample lies inside the reference, so it is a lower bound)."""
    from hybridstitch.testbed.quality import frechet_distance, real_fd_floor

    out = {}
    for n in sizes:
        disjoint = [real_fd_floor(n, seed=s, classifier=ref.classifier) for s in seeds]
        subset = []
        for s in seeds:
            idx = np.random.RandomState(s).permutation(ref.num_real)[:min(n, ref.num_real)]
            subset.append(frechet_distance(ref.real_features[torch.from_numpy(idx)], ref.real_features))
        out[str(n)] = dict(disjoint_mean=statistics.mean(disjoint), disjoint_std=statistics.pstdev(disjoint),
                           vs_reference_mean=statistics.mean(subset), vs_reference_std=statistics.pstdev(subset))
    return out


def run(settings: QualitySettings) -> dict:
    torch.set_num_threads(settings.threads)
    t_start = time.perf_counter()
    rows = resolve_methods(settings.methods)
    seeds = list(settings.seeds)
    n = settings.samples_per_seed
    batch = min(settings.batch_size, n)
    pipe = load_testbed_pipeline()
    ref = QualityReference()
    configs = {label: StitchConfig.preset(preset_of(preset)) for label, preset, _ in rows}
    pipes = pipelines(pipe, rows)
    ratios = sorted({r for c in configs.values() for r in c.mask_ratios})
    lat = measure_call_latencies(pipe, batch, ratios, settings.guidance_scale, rounds=settings.latency_rounds)
    print(f"quality: {len(rows)} rows x {len(seeds)} seeds x {n} samples, {settings.steps} steps, guidance "
          f"{settings.guidance_scale}, batch {batch}, {settings.threads} thread(s)\nper-call medians (s): {json.dumps(lat.to_dict())}",
          flush=True)
    labels = balanced_labels(n)
    acc = {label: dict(per_seed=[], images=[], traces=[]) for label, _, _ in rows}
    report = None
    for k, seed in enumerate(seeds):
        noise = initial_noise(n, seed)
        large_images = large_feats = None
        for label, preset, table in rows:  # every method of a seed in turn, so load drifts hit all alike
            if k >= settings.ablation_seeds and is_ablation(label, table):
                continue
            res = sample(pipes[label], configs[label], labels, noise, settings.steps, settings.guidance_scale, batch)
            if label == "large":
                large_images, large_feats = res.images, ref.features(res.images)
            q = ref.evaluate(res.images, labels, large_images, large_feats)
            a = acc[label]
            a["per_seed"].append(dict(seed=seed, samples=n, wall_seconds=res.wall_seconds,
                                      modelled_seconds=modelled_seconds(res.traces, lat, batch), **q))
            a["images"].append(res.images)
            a["traces"].extend(res.traces)
            print(f"  seed {seed} {label:<36} FD {q['fd']:7.1f} acc {q['accuracy']:.3f} dist {q['feature_distance']:5.2f} "
                  f"psnr {q['psnr']:5.1f} wall {res.wall_seconds:6.1f}s ({time.perf_counter() - t_start:.0f}s)", flush=True)
        # A report after every seed, so a run cut short still leaves its finished seeds.
        report = summarize(settings, rows, configs, acc, seeds[:k + 1], n, batch, lat, ref, t_start)
        write(report, settings.out)
    print("\n" + markdown(report))
    print(f"wrote {settings.out}.{{json,md,png}} in {report['seconds']:.0f} s")
    return report


def is_ablation(label: str, table: str) -> bool:
    """Rows beyond Table 1's main comparison: Tables 2-3 and the paper-thresholds row."""
    return table in ("2", "3") or "paper" in label


def summarize(settings: QualitySettings, rows, configs, acc, seeds, n, batch, lat, ref, t_start) -> dict:
    from hybridstitch.testbed.quality import frechet_distance

    records, hooks = [], {}
    for label, preset, table in rows:
        a = acc[label]
        if not a["per_seed"]:
            continue
        hooked = None if preset in PRESETS else cachehooks.method(preset).description
        if hooked:
            hooks[label] = hooked
        pooled = torch.cat(a["images"])
        records.append(row_record(
            label, preset, table, a, acc["large"], frechet_distance(ref.features(pooled), ref.real_features),
            configs[label].to_dict(), hooked, mean_switch_steps(a["traces"]), mean_stage_counts(a["traces"]),
            refreshes_per_image(a["traces"])))
    sizes = sorted({n} | {r["samples"] for r in records})
    return dict(
        date=datetime.date.today().isoformat(), machine=describe_machine(machine_info(settings.threads)), command=" ".join(sys.argv),
        note=settings.note, settings=dict(samples_per_seed=n, seeds=list(seeds), ablation_seeds=settings.ablation_seeds, batch_size=batch,
                      steps=settings.steps, guidance_scale=settings.guidance_scale),
        fd_reference=f"all {ref.num_real} real digits (train + held-out), classifier features",
        per_call_seconds=lat.to_dict(), real_fd_floor=real_floors(ref, sizes, seeds), rows=records, hooks=hooks,
        front_measured=pareto_front(records), front_modelled=pareto_front(records, x="speedup_modelled"),
        seconds=time.perf_counter() - t_start,
    )


def write(report: dict, out: str) -> None:
    write_report(out, report, markdown(report), plot(report))


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--samples-per-seed", type=int, default=250, help="samples per seed and row (digits 0-9 equally)")
    p.add_argument("--seeds", type=_seeds, default=(0, 1, 2, 3), help="comma-separated noise seeds")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=1.25)
    p.add_argument("--methods", default=None,
                   help="comma-separated row labels, presets or cached methods (hybridstitch.cachehooks; default: every row)")
    p.add_argument("--ablation-seeds", type=int, default=None,
                   help="run the Table 2-3 and paper-thresholds rows on the first N seeds only (default: all seeds)")
    p.add_argument("--batch-size", type=int, default=125, help="prompts per pipeline call (CFG doubles it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--latency-rounds", type=int, default=5)
    p.add_argument("--out", default=DEFAULT_OUT, help="output path without extension (.json, .md, .png are written)")
    p.add_argument("--note", default="", help="why this run differs from the defaults; kept in the JSON and the table")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: rewrite OUT.md and OUT.png from OUT.json (after a change to the report's layout)")
    return p


def settings_from_args(args: argparse.Namespace) -> QualitySettings:
    """The parsed command line as typed settings (the only place that reads the ``Namespace``)."""
    return QualitySettings(**{f.name: getattr(args, f.name) for f in fields(QualitySettings)})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        with open(args.out + ".json") as f:
            write(json.load(f), args.out)
        print(f"rewrote {args.out}.md and {args.out}.png from {args.out}.json")
        return 0
    try:
        run(settings_from_args(args))
    except HybridStitchError as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
