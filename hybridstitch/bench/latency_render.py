"""The latency benchmark's report as Markdown and as a plot (speed-up per method per backend)."""

from __future__ import annotations


def _fmt_s(st: dict | None) -> str:
    if not st:
        return "-"
    return f"{st['median']:.3g} ({st['min']:.3g}-{st['max']:.3g})"


def _fmt_ms(st: dict | None) -> str:
    if not st:
        return "-"
    return f"{st['median'] * 1e3:.3g} ({st['min'] * 1e3:.3g}-{st['max'] * 1e3:.3g})"


def _stages(counts: dict) -> str:
    return "/".join(str(counts.get(k, 0)) for k in ("large", "masked", "small"))


def _backend_section(b: str, r: dict, methods: list[str]) -> list[str]:
    lines = ["", f"### {b} (warm-up {r['warmup_seconds']:.1f} s)", "",
             "| method | latency s | speed-up | vs eager large | switch steps | stages L/M/S | overhead "
             "| model s | measured / model | model speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        e = r["methods"].get(m)
        if e is None:
            continue
        mod = e.get("model")
        sw = ", ".join(map(str, e["switch_steps"])) or "-"
        if e["switch_steps_vary"]:
            sw += " (varies)"
        model_cells = (f"{mod['total_seconds']:.3g} | {e['measured_over_model']:.3f} | {mod['speedup']:.2f}x"
                       if mod else "n/a | n/a | n/a")
        vs_eager = f"{e['speedup_vs_eager_large']:.2f}x" if e.get("speedup_vs_eager_large") else "n/a"
        speedup = f"{e['speedup']:.2f}x" if e["speedup"] else "n/a"
        lines.append(
            f"| {m} | {_fmt_s(e['seconds'])} | {speedup} | {vs_eager} | {sw} | {_stages(e['stage_counts'])} | "
            f"{e['overhead_share']:.1%} | {model_cells} |"
        )
    pc = r["per_call"]
    lines += ["", f"Per-call latencies ({b}), ms: t_l {_fmt_ms(pc['large'])}, t_s {_fmt_ms(pc['small'])}"
              + (f", t_s/t_l {r['t_s_over_t_l']:.3f} (break-even ratio 1 - t_s/t_l = {r['break_even_ratio']:.2f})"
                 if r["t_s_over_t_l"] else "")]
    if r["bound"]:
        lines += ["", "| bucket r | t_l(r) ms | t_l(r) / t_l | t_l(r) + t_s ms | t_l ms | t_l(r) + t_s < t_l |",
                  "|---|---|---|---|---|---|"]
        for bd in r["bound"]:
            st = pc["large_masked"][str(bd["ratio"])]
            lines.append(f"| {bd['ratio']:g} | {_fmt_ms(st)} | {bd['t_l_r_over_t_l']:.3f} | "
                         f"{bd['t_l_r_plus_t_s'] * 1e3:.3g} | {bd['t_l'] * 1e3:.3g} | "
                         f"{'yes' if bd['holds'] else '**no**'} |")
    return lines


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# Latency benchmark",
        "",
        f"{meta['date']} · {meta['machine']} · torch {meta['torch']}"
        + (f" · onnxruntime {meta['onnxruntime']}" if "onnxruntime" in meta else "")
        + (f" · GPU {meta['gpu']}" if "gpu" in meta else "")
        + f" · {meta['threads']} thread(s) · warm-up + {meta['reps']} interleaved repetitions; medians (min-max)",
        "",
        "Speed-up: over large-only on the same backend. Overhead: share of the end-to-end time outside model "
        "calls (mask selection, gather/scatter, merging, metric, scheduler, input preparation). Model: the paper's "
        "latency model (Eqs. 3-8) from the per-call latencies measured in the same runs; measured / model > 1 is "
        "the runtime's overhead. Stages: large / masked / small-only steps.",
    ]
    for wname, w in report["workloads"].items():
        lines += ["", f"## {wname}", ""]
        if w.get("status") == "n/a":
            lines.append(f"n/a: {w['reason']}")
            continue
        for k, v in w["description"].items():
            lines.append(f"- {k}: {v}")
        backends = w["backends"]
        methods = w["methods"]
        lines += ["", "### Speed-up over large-only", ""]
        lines.append("| method | " + " | ".join(backends) + " |")
        lines.append("|---|" + "---|" * len(backends))
        for m in methods:
            row = []
            for b in backends:
                r = backends[b]
                e = r.get("methods", {}).get(m) if r["status"] == "ok" else None
                row.append(f"{e['speedup']:.2f}x" if e and e["speedup"] else "n/a")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        for b, r in backends.items():
            if r["status"] != "ok":
                lines.append(f"\n{b}: n/a ({r['reason']})")
        for b, r in backends.items():
            if r["status"] == "ok":
                lines += _backend_section(b, r, methods)
    return "\n".join(lines) + "\n"


def render_plot(report: dict) -> bytes | None:
    """Speed-up over large-only per method, one bar per backend, one panel per workload (None: nothing ran)."""
    from .report import figure_png, pyplot

    panels = [(w, d) for w, d in report["workloads"].items() if d.get("status") != "n/a"]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for ax, (wname, w) in zip(axes[:, 0], panels):
        methods = w["methods"]
        ok = [b for b, r in w["backends"].items() if r["status"] == "ok"]
        width = 0.8 / max(1, len(ok))
        for j, b in enumerate(ok):
            ys = [(w["backends"][b]["methods"].get(m) or {}).get("speedup") or 0.0 for m in methods]
            ax.bar([i + (j - (len(ok) - 1) / 2) * width for i in range(len(methods))], ys, width, label=b)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speed-up over large-only")
        na = [f"{b}: n/a" for b, r in w["backends"].items() if r["status"] != "ok"]
        ax.set_title(f"{wname}" + (f"  ({'; '.join(na)})" if na else ""), fontsize=9)
        if ok:
            ax.legend(fontsize=8)
    meta = report["meta"]
    fig.suptitle(f"{meta['date']} · {meta['machine']} · {meta['threads']} thread(s)", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)
