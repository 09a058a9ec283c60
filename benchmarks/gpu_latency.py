"""GPU latency at the real sizes: SD3.5 Large + SD3 Medium transformers, eager PyTorch.

The two architectures at their real sizes (DESIGN.md section 3: 38 layers x 38 heads x 64 with
qk rms_norm, and 24 x 24 x 64), random fp16 weights built directly on the GPU (no checkpoint
needed), 768x768 (a 96x96x16 latent = 2304 image tokens), 333 text tokens, CFG batch 2.

1. Per-call latencies with CUDA events (median of ``--iters`` after ``--warmup``): the large
   model (plain, and storing its KV cache), the small model, and our masked large forward
   (:class:`hybridstitch.engine.torch_backend.TorchDenoiser`, the method's own KV-cache path)
   at each bucket ratio; the mask-ratio bound ``t_l(r) + t_s < t_l`` per bucket.
2. End to end, ``--steps`` steps with a replayed schedule (switch steps given, not decided from
   ``d_i``): large-only, T-Stitch, SRDiffusion-style, HybridStitch-10/20/30/40, interleaved
   repetitions, each beside the paper's latency model (Eqs. 3-8) computed from step 1.

The budget is estimated from step 1 and printed before step 2; repetitions (then methods) are
cut to stay under ``--budget-s`` (default 330 s, so the whole script, model construction
included, stays under 6 minutes on one H100). Writes ``--out``.json and .md with the GPU
name and date.

    python benchmarks/gpu_latency.py                          # on a CUDA machine
    python benchmarks/gpu_latency.py --steps 28 --methods large,hybridstitch-30
    python benchmarks/gpu_latency.py --dry-run --out /tmp/g   # CPU, tiny models, seconds

CUDA graphs are not measured (the masked forward's cache updates would need static buffers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import torch

from hybridstitch.bench import ReplaySwitches, replay_denoise, replay_stages
from hybridstitch.config import PRESETS, StitchConfig
from hybridstitch.fileio import atomic_write_text
from hybridstitch.latency_model import (
    CallLatencies,
    break_even_ratio,
    mask_ratio_bound,
    predict_from_counts,
    predict_from_trace,
    ratio_key,
)
from hybridstitch.masks import tokens_for_ratio

# diffusers configs of the real transformers (stabilityai/stable-diffusion-3.5-large, -3-medium)
SD35_LARGE = dict(num_layers=38, num_attention_heads=38, attention_head_dim=64, caption_projection_dim=2432,
                  qk_norm="rms_norm", joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192)
SD3_MEDIUM = dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
                  qk_norm=None, joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192)
TINY_LARGE = dict(num_layers=2, num_attention_heads=4, attention_head_dim=8, caption_projection_dim=32,
                  qk_norm="rms_norm", joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=16)
TINY_SMALL = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
                  qk_norm=None, joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=16)

DEFAULT_METHODS = ("large", "t-stitch", "srdiffusion", "hybridstitch-10", "hybridstitch-20", "hybridstitch-30", "hybridstitch-40")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list of preset names")
    p.add_argument("--switch-steps", type=int, nargs=2, default=[15, 35], metavar=("S1", "S2"),
                   help="HybridStitch: large before S1, masked until S2, small after")
    p.add_argument("--tstitch-switch", type=int, default=20, help="T-Stitch: small before this step, large after")
    p.add_argument("--srdiffusion-switch", type=int, default=25, help="SRDiffusion-style: large before this step, small after")
    p.add_argument("--buckets", default="0.1,0.2,0.3,0.4", help="mask ratios whose masked call is timed")
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5")
    p.add_argument("--guidance-scale", type=float, default=4.5)
    p.add_argument("--reps", type=int, default=2, help="end-to-end repetitions per method (interleaved)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per call in step 1")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=330.0, help="cut repetitions / methods to finish within this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "gpu_latency"), help="output stem (.json, .md)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default: fp16 on a GPU, fp32 in a dry run")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, float32: checks the script in seconds")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in PRESETS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    args.buckets = sorted({ratio_key(float(r)) for r in args.buckets.split(",") if r.strip()})
    if args.dry_run:
        args.steps, args.height, args.width, args.text_tokens = min(args.steps, 8), 128, 128, 8
        args.switch_steps, args.tstitch_switch, args.srdiffusion_switch = [2, 6], 3, 4
        args.iters, args.warmup = min(args.iters, 3), 1
    return args


@contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(cfg: dict, device, dtype, seed: int):
    """A random-weight SD3 transformer made on ``device`` in ``dtype`` (no fp32 copy on the GPU)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # .to(dtype) on a model made in place warns about float32 modules it has none of
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, **cfg)
    return model.to(device=device, dtype=dtype).eval()


def time_call(fn, iters: int, warmup: int, cuda: bool) -> list[float]:
    """Seconds per call: CUDA events on a GPU, perf_counter otherwise."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main(argv=None) -> int:
    t_script = time.perf_counter()
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_latency: no CUDA device; run on a GPU machine, or pass --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp16" if cuda else "fp32")]
    if not cuda:
        torch.set_num_threads(1)
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hybridstitch.conditioning import Conditioning
    from hybridstitch.engine.torch_backend import TorchDenoiser

    gpu = torch.cuda.get_device_name(device) if cuda else "CPU (dry run)"
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "dtype": str(dtype).replace("torch.", ""),
        "dry_run": args.dry_run,
        "height": args.height, "width": args.width, "text_tokens": args.text_tokens,
        "cfg_batch": 2 if args.guidance_scale > 1 else 1, "steps": args.steps,
        "command": " ".join(sys.argv),
    }
    print(f"gpu_latency: {gpu}, {meta['dtype']}, {args.height}x{args.width}, CFG batch {meta['cfg_batch']}, "
          f"{args.steps} steps, budget {args.budget_s:.0f} s")

    # 0. Models
    t0 = time.perf_counter()
    large_cfg, small_cfg = (TINY_LARGE, TINY_SMALL) if args.dry_run else (SD35_LARGE, SD3_MEDIUM)
    large = TorchDenoiser(build(large_cfg, device, dtype, args.seed), "large")
    small = TorchDenoiser(build(small_cfg, device, dtype, args.seed + 1), "small")
    meta["build_seconds"] = time.perf_counter() - t0
    meta["params"] = {n: sum(p.numel() for p in d.model.parameters()) for n, d in (("large", large), ("small", small))}
    print(f"built large ({meta['params']['large'] / 1e9:.2f} B params) and small ({meta['params']['small'] / 1e9:.2f} B) "
          f"in {meta['build_seconds']:.1f} s")

    g = torch.Generator().manual_seed(args.seed)
    h, w = args.height // 8, args.width // 8
    p = large.spec.patch_size
    n_tok = (h // p) * (w // p)
    latents = torch.randn(1, 16, h, w, generator=g).to(device, dtype)  # [1, 16, h, w]
    pe = torch.randn(2, args.text_tokens, large.spec.joint_attention_dim, generator=g).to(device, dtype)  # [uncond, cond]
    pooled = torch.randn(2, large.spec.pooled_projection_dim, generator=g).to(device, dtype)
    cond = Conditioning(pe, pooled) if args.guidance_scale > 1 else Conditioning(pe[1:], pooled[1:])
    batch = cond.prompt_embeds.shape[0]
    x_in = latents.expand(batch, -1, -1, -1).contiguous()
    ts = torch.full((batch,), 500.0, device=device)
    meta["image_tokens"] = n_tok

    # 1. Per-call latencies
    calls: dict[str, dict] = {}
    cache = large.new_cache(batch, h, w)
    calls["large"] = stats(time_call(lambda: large.forward(x_in, cond.prompt_embeds, cond.pooled, ts), args.iters, args.warmup, cuda))
    calls["large+kv"] = stats(time_call(lambda: large.forward(x_in, cond.prompt_embeds, cond.pooled, ts, cache=cache),
                                        args.iters, args.warmup, cuda))
    calls["small"] = stats(time_call(lambda: small.forward(x_in, cond.prompt_embeds, cond.pooled, ts), args.iters, args.warmup, cuda))
    masked = {}
    for r in args.buckets:
        k = tokens_for_ratio(r, n_tok)
        index = torch.sort(torch.randperm(n_tok, generator=g)[:k]).values.to(device)[None].expand(batch, -1).contiguous()  # [B, k]
        masked[r] = stats(time_call(lambda: large.forward_masked(x_in, cond.prompt_embeds, cond.pooled, ts, index=index, cache=cache),
                                    args.iters, args.warmup, cuda))
        masked[r]["tokens"] = k
    lat = CallLatencies(calls["large"]["median"], calls["small"]["median"], {r: m["median"] for r, m in masked.items()})
    bound = [{"ratio": r, "t_l_r": t, "t_l_r_over_t_l": t / lat.large, "holds": mask_ratio_bound(lat.large, lat.small, t)}
             for r, t in sorted(lat.masked.items())]
    print(f"t_l {lat.large * 1e3:.1f} ms, t_s {lat.small * 1e3:.1f} ms, "
          + ", ".join(f"t_l({r:g}) {t * 1e3:.1f} ms" for r, t in sorted(lat.masked.items())))

    # 2. End to end, replayed schedule
    switches = ReplaySwitches(stitch=tuple(args.switch_steps), tstitch=args.tstitch_switch, srdiffusion=args.srdiffusion_switch)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    configs = [StitchConfig.preset(m) for m in args.methods]
    for c in configs:
        for r in c.mask_ratios:
            if ratio_key(r) not in lat.masked:
                print(f"gpu_latency: {c.name} needs bucket {r:g}; add it to --buckets", file=sys.stderr)
                return 2
    schedules = {c.name: replay_stages(c, args.steps, switches) for c in configs}
    warm = ReplaySwitches(stitch=(2, 4), tstitch=2, srdiffusion=2)

    def run(c, stages):
        return replay_denoise(large, small, scheduler, latents, cond, c, stages, args.guidance_scale)[1]

    estimate = {}
    for c in configs:
        st = schedules[c.name]
        counts: dict[float, int] = {}
        for s in st:
            if s.kind == "masked":
                counts[ratio_key(s.mask_ratio)] = counts.get(ratio_key(s.mask_ratio), 0) + 1
        pred = predict_from_counts(sum(s.kind == "large" for s in st), counts, sum(s.kind == "small" for s in st), lat,
                                   masked_runs_full_large=c.stage2_large == "full")
        estimate[c.name] = pred.total_seconds * 1.1  # + the runtime's overhead
    warm_cost = sum(min(5, args.steps) * lat.large for _ in configs)
    left = args.budget_s - (time.perf_counter() - t_script) - warm_cost
    per_rep = sum(estimate.values())
    reps = max(0, min(args.reps, int(left // per_rep))) if per_rep > 0 else args.reps
    keep = list(configs)
    if reps == 0:  # not even one repetition of everything: keep methods in order while they fit
        reps, keep, acc = 1, [], 0.0
        for c in configs:
            if acc + estimate[c.name] <= left:
                keep.append(c)
                acc += estimate[c.name]
    dropped = [c.name for c in configs if c not in keep]
    print(f"budget: {time.perf_counter() - t_script:.0f} s used, ~{per_rep:.1f} s per repetition of {len(configs)} methods; "
          f"running {reps} repetition(s)" + (f", dropping {', '.join(dropped)}" if dropped else ""))
    meta.update(reps=reps, dropped_methods=dropped, estimate_seconds=estimate)

    for c in keep:  # warm the loop itself (the calls are warm already)
        run(c, replay_stages(c, min(5, args.steps), warm))
    traces: dict[str, list] = {c.name: [] for c in keep}
    for _ in range(reps):
        for c in keep:
            traces[c.name].append(run(c, schedules[c.name]))

    base = statistics.median(t.total_seconds for t in traces["large"]) if traces.get("large") else None
    methods = {}
    for c in keep:
        secs = [t.total_seconds for t in traces[c.name]]
        med = statistics.median(secs)
        tr = traces[c.name][0]
        pred = predict_from_trace(tr, lat)
        model_s = statistics.median(t.model_seconds for t in traces[c.name])
        methods[c.name] = {
            "seconds": stats(secs),
            "speedup": base / med if base else None,
            "switch_steps": tr.switch_steps,
            "stage_counts": tr.stage_counts,
            "overhead_share": (med - model_s) / med,
            "model": pred.to_dict(),
            "measured_over_model": med / pred.total_seconds,
        }
    meta["total_seconds"] = time.perf_counter() - t_script
    if cuda:
        meta["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    report = {
        "meta": meta,
        "switches": {"hybridstitch": list(switches.stitch), "t-stitch": switches.tstitch, "srdiffusion": switches.srdiffusion},
        "per_call": {**calls, "large_masked": {str(r): m for r, m in masked.items()}},
        "t_s_over_t_l": lat.small / lat.large,
        "break_even_ratio": break_even_ratio(lat.large, lat.small),
        "bound": bound,
        "methods": methods,
    }
    md = render(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out + ".json", json.dumps(report, indent=2))
    atomic_write_text(args.out + ".md", md)
    print(md)
    print(f"wrote {args.out}.json, {args.out}.md in {meta['total_seconds']:.0f} s")
    return 0


def render(report: dict) -> str:
    m = report["meta"]
    ms = lambda s: f"{s['median'] * 1e3:.1f} ({s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f})"  # noqa: E731
    pc = report["per_call"]
    t_l = pc["large"]["median"]
    lines = [
        f"# GPU latency: SD3.5 Large + SD3 Medium transformers{' (DRY RUN: tiny CPU models)' if m['dry_run'] else ''}",
        "",
        f"{m['date']} · {m['device']} · torch {m['torch']}" + (f" · CUDA {m['cuda']}" if m["cuda"] else "")
        + f" · {m['dtype']} random weights · {m['height']}x{m['width']} ({m['image_tokens']} image + {m['text_tokens']} text tokens)"
        + f" · CFG batch {m['cfg_batch']} · {m['steps']} steps · torch eager",
        "",
        f"## Per-call latency, ms (median (min-max) of {pc['large']['n']} after warm-up)",
        "",
        "| call | ms | / t_l | t_l(r) + t_s < t_l |",
        "|---|---|---|---|",
        f"| large (t_l) | {ms(pc['large'])} | 1.000 | |",
        f"| large + KV-cache store | {ms(pc['large+kv'])} | {pc['large+kv']['median'] / t_l:.3f} | |",
        f"| small (t_s) | {ms(pc['small'])} | {pc['small']['median'] / t_l:.3f} | |",
    ]
    for b in report["bound"]:
        s = pc["large_masked"][str(b["ratio"])]
        lines.append(f"| masked large r={b['ratio']:g} ({s['tokens']} tokens) | {ms(s)} | {b['t_l_r_over_t_l']:.3f} | "
                     f"{'yes' if b['holds'] else '**no**'} |")
    lines += [
        "",
        f"t_s / t_l = {report['t_s_over_t_l']:.3f}; break-even ratio 1 - t_s/t_l = {report['break_even_ratio']:.2f}.",
        "",
        f"## End to end ({m['reps']} interleaved repetition(s); replayed switch steps {report['switches']})",
        "",
        "| method | switch steps | stages L/M/S | s median (min-max) | speed-up | model s | measured / model | model speed-up | overhead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in report["methods"].items():
        sc = e["stage_counts"]
        st = e["seconds"]
        lines.append(
            f"| {name} | {', '.join(map(str, e['switch_steps'])) or '-'} | "
            f"{sc.get('large', 0)}/{sc.get('masked', 0)}/{sc.get('small', 0)} | "
            f"{st['median']:.3g} ({st['min']:.3g}-{st['max']:.3g}) | "
            + (f"{e['speedup']:.2f}x" if e["speedup"] else "n/a")
            + f" | {e['model']['total_seconds']:.3g} | {e['measured_over_model']:.3f} | {e['model']['speedup']:.2f}x | "
            f"{e['overhead_share']:.1%} |"
        )
    if m.get("dropped_methods"):
        lines += ["", f"Dropped to fit the budget: {', '.join(m['dropped_methods'])}."]
    lines += ["", f"Model construction {m['build_seconds']:.0f} s; whole script {m['total_seconds']:.0f} s"
              + (f"; peak GPU memory {m['max_memory_gib']:.1f} GiB" if "max_memory_gib" in m else "") + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
