"""The calibration sweep's report: the Markdown table, the scatter plot with the Pareto fronts,
and the chosen presets as Python source for ``PRESETS``.

Rendering only; the sweep and the selection rule are in :mod:`hybridstitch.testbed.calibrate`.
"""

from __future__ import annotations


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown_table(rows: list[dict], presets: dict) -> str:
    chosen = {kw["source"]: name for name, kw in presets.items() if not str(kw["source"]).startswith("testbed")}
    lines = [
        "| config | ratio | thresholds | switch steps | modelled ms/img | speed-up | wall s | FD | accuracy | dist. to large | PSNR dB | front | preset |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        thr = ", ".join(f"{t:g}" for t in r["thresholds"]) if r["method"] == "hybridstitch" else (
            f"{r['srdiffusion_threshold']:g}" if r["method"] == "srdiffusion" else "-")
        ratio = ", ".join(f"{x:g}" for x in r["mask_ratios"]) or "-"
        front = ", ".join(s for s, k in (("F", "front_fd"), ("D", "front_distance")) if r.get(k))
        lines.append(
            f"| {r['name']} | {ratio} | {thr} | {', '.join(f'{s:.1f}' for s in r['mean_switch_steps']) or '-'} | "
            f"{r['modelled_seconds_per_image'] * 1e3:.2f} | {r['modelled_speedup']:.2f}x | {r['wall_seconds']:.1f} | "
            f"{r['fd']:.1f} | {r['accuracy'] * 100:.1f} % | {_fmt(r.get('feature_distance'), '.2f')} | "
            f"{_fmt(r.get('psnr'), '.1f')} | {front or ''} | {chosen.get(r['name'], '')} |"
        )
    return "\n".join(lines)


def presets_source(presets: dict) -> str:
    """The chosen presets as Python dict entries, ready for ``PRESETS`` in config.py."""
    lines = []
    for name, kw in presets.items():
        items = ", ".join(f"{k}={v!r}" for k, v in kw.items() if k != "source")
        lines.append(f'    "{name}": dict({items}),')
    return "\n".join(lines)


def render_markdown(result: dict, presets: dict) -> str:
    """The whole ``calibration.md`` from the result :func:`~hybridstitch.testbed.calibrate.run` writes."""
    s, lat, rule = result["settings"], result["per_call_seconds"], result["rule"]
    masked = ", ".join(f"{float(r):g}: {t * 1e3:.1f} ms" for r, t in sorted(lat["large_masked"].items(), key=lambda kv: float(kv[0])))
    return (
        f"# Testbed calibration\n\n{result['date']}, {result['machine']}\n\n`{result['command']}`\n\n"
        f"{s['samples']} samples (digits 0-9 equally), {s['steps']} steps, guidance {s['guidance_scale']}, seed {s['seed']}; "
        f"FD vs {result['fd_reference']}; distance to large: mean L2 of paired classifier features vs large-only "
        f"from the same noise. Latency: Eqs. 3-8 over per-call medians at batch {s['batch_size']} "
        f"(t_l {lat['large'] * 1e3:.1f} ms, t_s {lat['small'] * 1e3:.1f} ms, t_l(r) {masked}). "
        "Front: F = on the (modelled latency, FD) Pareto front, D = on the (modelled latency, distance) front.\n\n"
        + markdown_table(result["rows"], presets)
        + f"\n\n## Chosen presets\n\nRule: {rule['text']} (accuracy drop <= {rule['max_accuracy_drop']:g}, "
        f"distance <= {rule['max_distance_fraction']:g} x small-only's.)\n\n```python\n{presets_source(presets)}\n```\n\n"
        f"Total {result['seconds']:.0f} s.\n"
    )


def scatter_png(rows: list[dict], presets: dict) -> bytes:
    """Modelled speed-up against FD and against the distance to large, Pareto fronts dashed,
    the chosen presets' sources starred."""
    from hybridstitch.bench.report import figure_png, pyplot

    plt = pyplot()
    sources = {kw["source"] for kw in presets.values()}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"large": "k", "small": "tab:gray", "t-stitch": "tab:purple", "srdiffusion": "tab:orange", "hybridstitch": None}
    ratio_colour = {0.1: "tab:blue", 0.2: "tab:green", 0.3: "tab:red", 0.4: "tab:brown"}
    for ax, key, front_key, label in ((axes[0], "fd", "front_fd", "FD vs real digits"),
                                      (axes[1], "feature_distance", "front_distance", "distance to large (features)")):
        for r in rows:
            c = colours.get(r["method"]) or ratio_colour.get(r["mask_ratios"][0], "tab:cyan")
            ax.scatter(r["modelled_speedup"], r[key], color=c, s=40 if r["name"] in sources else 14,
                       marker="*" if r["name"] in sources else "o", zorder=3)
            if r["method"] in ("large", "small", "t-stitch") or r["name"] in sources:
                ax.annotate(r["name"], (r["modelled_speedup"], r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = sorted((r for r in rows if r.get(front_key)), key=lambda r: r["modelled_speedup"])
        ax.plot([r["modelled_speedup"] for r in front], [r[key] for r in front], "k--", lw=0.8, label="Pareto front")
        ax.set_xlabel("modelled speed-up over large-only")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ratio, c in ratio_colour.items():
        axes[0].scatter([], [], color=c, s=14, label=f"HybridStitch {ratio:.0%}")
    for m in ("large", "small", "t-stitch", "srdiffusion"):
        axes[0].scatter([], [], color=colours[m], s=14, label=m)
    axes[0].legend(fontsize=6)
    fig.suptitle("testbed calibration (stars: chosen presets)", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)
