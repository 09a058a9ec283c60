"""The shape of the paper's Tables 1-3 and Figure 7 on the trained testbed: quality vs latency.

Every method samples the same prompts from the same noise per seed (digits 0-9 equally), so
the distance to large-only is paired. Columns: FD against all 1,797 real digits in classifier
features (mean +- std over seeds, and of all seeds' samples pooled), prompt accuracy, distance
to large-only (mean L2 of paired classifier features, the LPIPS analogue, and PSNR), latency
(measured wall time of the sampling, and the latency model Eqs. 3-8 over per-call medians
measured at the start, interleaved), speed-ups over large-only, mean switch steps. The
real-vs-real FD floor at the same sample sizes is reported beside the table.

    python benchmarks/quality.py                       # writes benchmarks/results/quality.{json,md,png}
    python benchmarks/quality.py --methods large,small,testbed-30 --seeds 0 --samples-per-seed 100
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

from hybridstitch.bench.machine import describe_machine, machine_info
from hybridstitch.bench.report import figure_png, pyplot, write_report
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

# (row label, preset, the paper's table it mirrors)
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
    ablation_seeds: int | None = None  # Table 2-3 and paper-thresholds rows on the first N seeds (None: all)
    batch_size: int = 125  # prompts per pipeline call (CFG doubles it)
    threads: int = 1
    latency_rounds: int = 5
    out: str = DEFAULT_OUT  # output path without extension

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
            elif name in PRESETS:
                rows.append((name, name, "-"))
            else:
                raise HybridStitchError(f"unknown method {name!r}; use a row label ({', '.join(r[0] for r in ROWS)}) or a preset")
    rows = [r for r in rows if r[1] != "large"]
    missing = [p for _, p, _ in rows if p not in PRESETS]
    if missing:
        raise HybridStitchError(f"preset(s) {', '.join(missing)} missing from hybridstitch.config.PRESETS; "
                                "run `hybridstitch calibrate` and add the testbed presets first")
    return [ROWS[0]] + rows


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
    configs = {label: StitchConfig.preset(preset) for label, preset, _ in rows}
    ratios = sorted({r for c in configs.values() for r in c.mask_ratios})
    lat = measure_call_latencies(pipe, batch, ratios, settings.guidance_scale, rounds=settings.latency_rounds)
    print(f"quality: {len(rows)} rows x {len(seeds)} seeds x {n} samples, {settings.steps} steps, guidance "
          f"{settings.guidance_scale}, batch {batch}, {settings.threads} thread(s)\nper-call medians (s): {json.dumps(lat.to_dict())}",
          flush=True)
    labels = balanced_labels(n)
    acc = {label: dict(per_seed=[], images=[], traces=[], wall=0.0, modelled=0.0) for label, _, _ in rows}
    report = None
    for k, seed in enumerate(seeds):
        noise = initial_noise(n, seed)
        large_images = large_feats = None
        for label, preset, table in rows:  # every method of a seed in turn, so load drifts hit all alike
            if k >= settings.ablation_seeds and is_ablation(label, table):
                continue
            res = sample(pipe, configs[label], labels, noise, settings.steps, settings.guidance_scale, batch)
            if label == "large":
                large_images, large_feats = res.images, ref.features(res.images)
            q = ref.evaluate(res.images, labels, large_images, large_feats)
            a = acc[label]
            a["per_seed"].append(dict(seed=seed, wall_seconds=res.wall_seconds, **q))
            a["images"].append(res.images)
            a["traces"].extend(res.traces)
            a["wall"] += res.wall_seconds
            a["modelled"] += modelled_seconds(res.traces, lat, batch)
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

    results = {}
    large_wall, large_model = acc["large"]["wall"] / len(acc["large"]["per_seed"]), acc["large"]["modelled"] / len(acc["large"]["per_seed"])
    for label, preset, table in rows:
        a = acc[label]
        ps = a["per_seed"]
        if not ps:
            continue
        total = n * len(ps)
        fds = [p["fd"] for p in ps]
        pooled = torch.cat(a["images"])
        # Speed-ups per seed-run (ablation rows may have run on fewer seeds than large-only).
        wall_per_seed, model_per_seed = a["wall"] / len(ps), a["modelled"] / len(ps)
        results[label] = dict(
            preset=preset, paper_table=table, config=configs[label].to_dict(), samples=total, seeds=[p["seed"] for p in ps],
            fd_mean=statistics.mean(fds), fd_std=statistics.pstdev(fds) if len(fds) > 1 else 0.0,
            fd_pooled=frechet_distance(ref.features(pooled), ref.real_features),
            accuracy=statistics.mean(p["accuracy"] for p in ps),
            feature_distance=statistics.mean(p["feature_distance"] for p in ps),
            psnr=statistics.mean(p["psnr"] for p in ps),
            wall_seconds=a["wall"], wall_ms_per_image=a["wall"] / total * 1e3,
            modelled_seconds=a["modelled"], modelled_ms_per_image=a["modelled"] / total * 1e3,
            speedup_modelled=large_model / model_per_seed, speedup_measured=large_wall / wall_per_seed,
            mean_switch_steps=mean_switch_steps(a["traces"]), stage_counts=mean_stage_counts(a["traces"]),
            per_seed=ps,
        )
    sizes = sorted({n} | {r["samples"] for r in results.values()})
    return dict(
        date=datetime.date.today().isoformat(), machine=describe_machine(machine_info(settings.threads)), command=" ".join(sys.argv),
        settings=dict(samples_per_seed=n, seeds=list(seeds), ablation_seeds=settings.ablation_seeds, batch_size=batch,
                      steps=settings.steps, guidance_scale=settings.guidance_scale),
        fd_reference=f"all {ref.num_real} real digits (train + held-out), classifier features",
        per_call_seconds=lat.to_dict(), real_fd_floor=real_floors(ref, sizes, seeds), methods=results,
        seconds=time.perf_counter() - t_start,
    )


def write(report: dict, out: str) -> None:
    write_report(out, report, markdown(report), plot(report))


def markdown(report: dict) -> str:
    s = report["settings"]
    lat = report["per_call_seconds"]
    masked = ", ".join(f"{r}: {t * 1e3:.1f} ms" for r, t in lat["large_masked"].items())
    lines = [
        "# Quality vs latency on the testbed\n",
        f"{report['date']}, {report['machine']}. {len(s['seeds'])} seed(s) x {s['samples_per_seed']} samples per row "
        f"(digits 0-9 equally, the same noise for every method of a seed), {s['steps']} steps, guidance "
        f"{s['guidance_scale']}, {s['batch_size']} prompts per call. FD vs {report['fd_reference']}; distance to large: "
        f"mean L2 of paired classifier features against large-only from the same noise (the LPIPS analogue). "
        f"Modelled latency: Eqs. 3-8 over per-call medians at batch {s['batch_size']} (t_l {lat['large'] * 1e3:.1f} ms, "
        f"t_s {lat['small'] * 1e3:.1f} ms, t_l(r) {masked or '-'}); measured: wall time of the sampling on a shared machine.\n",
        "| table | method | preset | samples | FD (mean ± std over seeds) | FD pooled | accuracy | dist. to large | PSNR dB | "
        "wall s | ms/img | modelled ms/img | speed-up (modelled) | speed-up (measured) | mean switch steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in report["methods"].items():
        sw = ", ".join(f"{x:.1f}" for x in r["mean_switch_steps"]) or "-"
        lines.append(
            f"| {r['paper_table']} | {label} | {r['preset']} | {r['samples']} | {r['fd_mean']:.1f} ± {r['fd_std']:.1f} | {r['fd_pooled']:.1f} | "
            f"{r['accuracy'] * 100:.1f} % | {r['feature_distance']:.2f} | {r['psnr']:.1f} | {r['wall_seconds']:.0f} | "
            f"{r['wall_ms_per_image']:.1f} | {r['modelled_ms_per_image']:.1f} | {r['speedup_modelled']:.2f}x | "
            f"{r['speedup_measured']:.2f}x | {sw} |"
        )
    lines.append("\nReal-vs-real FD floor (mean ± std over the seeds):\n")
    lines.append("| n | two disjoint sets of n real digits | n real digits vs all 1,797 (the rows' reference) |")
    lines.append("|---|---|---|")
    for n, f in report["real_fd_floor"].items():
        lines.append(f"| {n} | {f['disjoint_mean']:.1f} ± {f['disjoint_std']:.1f} | {f['vs_reference_mean']:.1f} ± {f['vs_reference_std']:.1f} |")
    lines.append(f"\nTotal {report['seconds']:.0f} s.\n")
    return "\n".join(lines)


def plot(report: dict) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    table_colour = {"1": "tab:blue", "2": "tab:red", "3": "tab:green", "-": "tab:gray"}
    for ax, key, ylabel in ((axes[0], "fd_pooled", "FD (pooled) vs real digits"),
                            (axes[1], "feature_distance", "distance to large-only (features)")):
        for label, r in report["methods"].items():
            c = "k" if label in ("large", "small") else table_colour.get(r["paper_table"], "tab:gray")
            ax.scatter(r["speedup_modelled"], r[key], color=c, s=22, zorder=3)
            ax.annotate(label, (r["speedup_modelled"], r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("speed-up over large-only (latency model)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    floor = report["real_fd_floor"].get(str(report["methods"]["large"]["samples"]))
    if floor:
        axes[0].axhline(floor["disjoint_mean"], color="gray", ls=":", lw=1, label="real vs real, two disjoint sets")
        axes[0].axhline(floor["vs_reference_mean"], color="gray", ls="--", lw=1, label="real subset vs the reference")
        axes[0].legend(fontsize=7)
    fig.suptitle("testbed: quality vs speed-up (blue: Table 1, red: Table 2, green: Table 3)", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


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
    p.add_argument("--methods", default=None, help="comma-separated row labels or presets (default: every row)")
    p.add_argument("--ablation-seeds", type=int, default=None,
                   help="run the Table 2-3 and paper-thresholds rows on the first N seeds only (default: all)")
    p.add_argument("--batch-size", type=int, default=125, help="prompts per pipeline call (CFG doubles it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--latency-rounds", type=int, default=5)
    p.add_argument("--out", default=DEFAULT_OUT, help="output path without extension (.json, .md, .png are written)")
    return p


def settings_from_args(args: argparse.Namespace) -> QualitySettings:
    """The parsed command line as typed settings (the only place that reads the ``Namespace``)."""
    return QualitySettings(**{f.name: getattr(args, f.name) for f in fields(QualitySettings)})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(settings_from_args(args))
    except HybridStitchError as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
