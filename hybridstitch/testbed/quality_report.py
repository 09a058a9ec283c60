"""The quality benchmark's records, table and plot (``benchmarks/quality.py`` measures; this renders).

One record per row (:func:`row_record`): FD (mean and spread over the seeds, and pooled), prompt
accuracy, the paired distance to large-only and PSNR (mean and spread over the seeds), measured
wall time and its speed-up over large-only (the ratio of totals, and the spread of the per-seed
ratios), the latency model's speed-up (Eqs. 3-8; None for rows with cache hooks, whose cached
calls the model has no price for), switch steps, stage counts and refresh steps per image.
"""

from __future__ import annotations

import statistics

# row family -> (legend, colour)
FAMILIES = {
    "1": ("baselines, HybridStitch (Table 1)", "tab:blue"),
    "2": ("ablations (Table 2)", "tab:red"),
    "3": ("multi-mask (Table 3)", "tab:green"),
    "fresh": ("cache freshness (new)", "tab:purple"),
    "sigma": ("per-sigma thresholds (new)", "tab:olive"),
    "hook": ("diffusers cache hooks on large", "tab:orange"),
    "combo": ("HybridStitch + TaylorSeer (small-only steps)", "tab:brown"),
    "-": ("other", "tab:gray"),
}


def _spread(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def refreshes_per_image(traces) -> float:
    """Mean count of full large steps inside a masked stage (a freshness refresh) per image. HybridStitch
    only: T-Stitch's later stage is large by design, not a refresh."""
    if not traces:
        return 0.0
    return sum(sum(1 for s in t.steps if s.stage > 1 and s.stage_kind == "large") for t in traces
               if t.config.get("method", "hybridstitch") == "hybridstitch") / len(traces)


def row_record(label: str, preset: str, table: str, acc: dict, large: dict, fd_pooled: float, config: dict,
               hooks: str | None, switch_steps, stage_counts, refreshes: float) -> dict:
    """The JSON record of one row from its per-seed results ``acc["per_seed"]`` and large-only's (``large``)."""
    ps = acc["per_seed"]
    large_wall = {p["seed"]: p["wall_seconds"] for p in large["per_seed"]}
    large_model = {p["seed"]: p["modelled_seconds"] for p in large["per_seed"]}
    seeds = [p["seed"] for p in ps]
    wall = sum(p["wall_seconds"] for p in ps)
    per_seed_speed = [large_wall[p["seed"]] / p["wall_seconds"] for p in ps]
    modelled = None if hooks else sum(p["modelled_seconds"] for p in ps)
    samples = sum(p["samples"] for p in ps)
    dists = [p["feature_distance"] for p in ps]
    fds = [p["fd"] for p in ps]
    return dict(
        method=label, preset=preset, table=table, hooks=hooks, config=config, samples=samples, seeds=seeds,
        fd_mean=statistics.mean(fds), fd_std=_spread(fds), fd_pooled=fd_pooled,
        accuracy=statistics.mean(p["accuracy"] for p in ps),
        dist_to_large=statistics.mean(dists), dist_std=_spread(dists),
        psnr=statistics.mean(p["psnr"] for p in ps), psnr_std=_spread([p["psnr"] for p in ps]),
        wall_seconds=wall, wall_ms_per_image=wall / samples * 1e3,
        modelled_ms_per_image=None if modelled is None else modelled / samples * 1e3,
        speedup_measured=sum(large_wall[s] for s in seeds) / wall, speedup_measured_std=_spread(per_seed_speed),
        speedup_modelled=None if modelled is None else sum(large_model[s] for s in seeds) / modelled,
        mean_switch_steps=switch_steps, stage_counts=stage_counts, refreshes_per_image=refreshes, per_seed=ps,
    )


def pareto_front(rows: list[dict], x: str = "speedup_measured", y: str = "dist_to_large") -> list[str]:
    """The rows no other row beats on both (higher ``x``, lower ``y``), by ascending ``x``: their method names."""
    pts = [(r[x], r[y], r["method"]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    front = [m for a, b, m in pts if not any(a2 >= a and b2 <= b and (a2 > a or b2 < b) for a2, b2, _ in pts)]
    order = {m: a for a, _, m in pts}
    return sorted(front, key=order.get)


# rows of the HybridStitch family (the method, its ablations, multi-mask, freshness, per-sigma, combination)
HYBRID_FAMILY = ("1", "2", "3", "fresh", "sigma", "combo")


def versus(rows: list[dict], baseline: str = "t-stitch") -> list[dict]:
    """Each HybridStitch-family row against ``baseline``, paired by seed: the difference of the mean
    distance to large, the seeds on which the row is closer to large and on which it is faster (its
    wall time below the baseline's on the same seed and noise), and ``beats``: a lower mean distance
    at an equal or higher measured speed-up (``beats_modelled``: modelled)."""
    base = next((r for r in rows if r["method"] == baseline), None)
    if base is None:
        return []
    b_seed = {p["seed"]: p for p in base["per_seed"]}
    out = []
    for r in rows:
        if r["method"] == baseline or r["table"] not in HYBRID_FAMILY or r["preset"] in ("large", "small", "t-stitch") \
                or r["preset"].endswith("srdiffusion"):
            continue
        shared = [p for p in r["per_seed"] if p["seed"] in b_seed]
        out.append(dict(
            method=r["method"], dist_delta=r["dist_to_large"] - base["dist_to_large"],
            speedup_ratio=r["speedup_measured"] / base["speedup_measured"], seeds=len(shared),
            seeds_closer=sum(p["feature_distance"] < b_seed[p["seed"]]["feature_distance"] for p in shared),
            seeds_faster=sum(p["wall_seconds"] < b_seed[p["seed"]]["wall_seconds"] for p in shared),
            beats=r["dist_to_large"] < base["dist_to_large"] and r["speedup_measured"] >= base["speedup_measured"],
            modelled_ratio=None if r["speedup_modelled"] is None else r["speedup_modelled"] / base["speedup_modelled"],
            beats_modelled=r["speedup_modelled"] is not None and r["dist_to_large"] < base["dist_to_large"]
            and r["speedup_modelled"] >= base["speedup_modelled"],
        ))
    return out


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    s = report["settings"]
    lat = report["per_call_seconds"]
    masked = ", ".join(f"{r}: {t * 1e3:.0f} ms" for r, t in lat["large_masked"].items())
    lines = [
        "# Quality vs latency on the testbed\n",
        f"{report['date']}, {report['machine']}. {len(s['seeds'])} seed(s) x {s['samples_per_seed']} samples per row "
        f"(digits 0-9 equally, the same noise for every method of a seed; every row on every seed unless its sample "
        f"count says otherwise), {s['steps']} steps, guidance {s['guidance_scale']}, {s['batch_size']} prompts per "
        f"call, every image with its own stages. FD vs {report['fd_reference']}; distance to large: mean L2 of paired "
        f"classifier features against large-only from the same noise (the LPIPS analogue). Spreads (±) are the "
        f"standard deviation over seeds. Measured speed-up: large-only's wall time over the row's, seeds summed; "
        f"modelled: Eqs. 3-8 over per-call medians at batch {s['batch_size']} (t_l {lat['large'] * 1e3:.0f} ms, "
        f"t_s {lat['small'] * 1e3:.0f} ms, t_l(r) {masked or '-'}), none for rows with cache hooks.\n",
        *([f"**Note:** {report['note']}\n"] if report.get("note") else []),
        "| table | method | preset | samples | FD (mean ± std) | FD pooled | accuracy | dist. to large | PSNR dB | "
        "ms/img | modelled ms/img | speed-up (modelled) | speed-up (measured) | switch steps | refreshes/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        sw = ", ".join(f"{x:.1f}" for x in r["mean_switch_steps"]) or "-"
        lines.append(
            f"| {r['table']} | {r['method']} | {r['preset']} | {r['samples']} | {r['fd_mean']:.1f} ± {r['fd_std']:.1f} | "
            f"{r['fd_pooled']:.1f} | {r['accuracy'] * 100:.1f} % | {r['dist_to_large']:.2f} ± {r['dist_std']:.2f} | "
            f"{r['psnr']:.1f} | {r['wall_ms_per_image']:.1f} | {_f(r['modelled_ms_per_image'], '.1f')} | "
            f"{_f(r['speedup_modelled'], '.2f')}{'x' if r['speedup_modelled'] else ''} | "
            f"{r['speedup_measured']:.2f}x ± {r['speedup_measured_std']:.2f} | {sw} | {r['refreshes_per_image']:.1f} |")
    front = report.get("front_measured") or []
    lines.append(f"\nPareto front, distance to large vs measured speed-up: {', '.join(front) or '-'}.")
    lines.append(f"Pareto front, distance to large vs modelled speed-up: {', '.join(report.get('front_modelled') or []) or '-'}.")
    vs = versus(report["rows"])
    if vs:
        lines.append("\nHybridStitch-family rows against T-Stitch, paired by seed (same noise): the difference of the mean "
                     "distance to large (negative: closer), the measured speed-up over T-Stitch's, and on how many seeds "
                     "the row is closer to large / faster than T-Stitch. *Beats*: closer at an equal or higher measured "
                     "(modelled) speed-up.\n")
        lines.append("| method | Δ dist. to large | measured speed-up / T-Stitch's | modelled / T-Stitch's | seeds closer | "
                     "seeds faster | beats T-Stitch, measured | modelled |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for v in vs:
            lines.append(f"| {v['method']} | {v['dist_delta']:+.2f} | {v['speedup_ratio']:.2f}x | {_f(v['modelled_ratio'], '.2f')} | "
                         f"{v['seeds_closer']}/{v['seeds']} | {v['seeds_faster']}/{v['seeds']} | {'yes' if v['beats'] else 'no'} | "
                         f"{'yes' if v['beats_modelled'] else 'no'} |")
    if report.get("hooks"):
        lines.append("\nCache-hook rows (diffusers' hooks, `hybridstitch.cachehooks`):\n")
        lines += [f"- `{name}`: {text}" for name, text in report["hooks"].items()]
    lines.append("\nReal-vs-real FD floor (mean ± std over the seeds):\n")
    lines.append("| n | two disjoint sets of n real digits | n real digits vs all 1,797 (the rows' reference) |")
    lines.append("|---|---|---|")
    for n, f in report["real_fd_floor"].items():
        lines.append(f"| {n} | {f['disjoint_mean']:.1f} ± {f['disjoint_std']:.1f} | {f['vs_reference_mean']:.1f} ± {f['vs_reference_std']:.1f} |")
    lines.append(f"\nTotal {report['seconds']:.0f} s.\n")
    return "\n".join(lines)


def plot(report: dict) -> bytes:
    """Distance to large and FD against the measured speed-up, every row with its seed spread, the front drawn."""
    from hybridstitch.bench.report import figure_png, pyplot

    plt = pyplot()
    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, err, ylabel in ((axes[0], "dist_to_large", "dist_std", "distance to large-only (features), mean ± std over seeds"),
                                 (axes[1], "fd_mean", "fd_std", "FD vs real digits, mean ± std over seeds")):
        seen = set()
        for r in rows:
            legend, colour = FAMILIES.get(r["table"], FAMILIES["-"])
            ax.errorbar(r["speedup_measured"], r[key], xerr=r["speedup_measured_std"], yerr=r[err], fmt="o", ms=4,
                        color=colour, ecolor=colour, elinewidth=0.8, capsize=2, zorder=3,
                        label=None if legend in seen else legend)
            seen.add(legend)
            ax.annotate(r["method"], (r["speedup_measured"], r[key]), fontsize=5.5, xytext=(3, 3), textcoords="offset points")
        front = [next(r for r in rows if r["method"] == m) for m in pareto_front(rows, y=key)]
        ax.plot([r["speedup_measured"] for r in front], [r[key] for r in front], "k--", lw=0.8, zorder=2, label="Pareto front")
        ax.set_xlabel("speed-up over large-only (measured wall time)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    floor = report["real_fd_floor"].get(str(rows[0]["samples"])) if rows else None
    if floor:
        axes[1].axhline(floor["disjoint_mean"], color="gray", ls=":", lw=1, label="real vs real, two disjoint sets")
    axes[0].legend(fontsize=6.5, loc="upper left")
    axes[1].legend(fontsize=6.5, loc="upper left")
    fig.suptitle(f"testbed, {report['settings']['steps']} steps: quality vs measured speed-up ({report['date']})", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


__all__ = ["FAMILIES", "HYBRID_FAMILY", "markdown", "pareto_front", "plot", "refreshes_per_image", "row_record", "versus"]
