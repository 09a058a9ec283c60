"""Per-call latency of each exported graph on ONNX Runtime vs torch eager, and each masked bucket's cost.

Exports the engine set of a large/small pair (``hybridstitch-export``'s code path), loads it on
ONNX Runtime (CPU provider) and the same checkpoints in torch, and times every graph on both:
the full small, the full large (storing its KV cache) and one masked large per bucket. One
thread for both runtimes, interleaved repetitions (each rep runs every graph on ORT and torch,
every second rep in reverse order; :mod:`hybridstitch.bench.timer`), medians of per-rep ratios
with min-max. For each bucket it also reports the masked graph's cost relative to the full
large graph next to the ideal token fraction ``(k + T) / (N + T)``.

Models, in order of preference:

* ``--large DIR --small DIR``: your checkpoints;
* the shipped testbed pair (``hybridstitch/testbed/weights/{large,small}``) when present;
* else an SD3-shaped random pair at CPU size: SD3.5-Large-like (qk rms_norm) scaled to width
  576 (9 x 64), 6 layers, a 48x48 latent (N = 576) and T = 83 text tokens, with an SD3-Medium-like
  small (no qk-norm, width 384, 4 layers); ``--tiny`` shrinks both to a quick check.

    python benchmarks/engines.py [--tiny] [--reps 7] [--out benchmarks/results/engines]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from hybridstitch.bench.machine import describe_machine, machine_info
from hybridstitch.bench.report import write_report
from hybridstitch.bench.timer import InterleavedTimer, ratio_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Read by argparse; a constant, not the module docstring, so ``python -OO`` (no docstrings) works.
DESCRIPTION = "Per-call latency of each exported graph on ONNX Runtime vs torch eager, and each masked bucket's cost."

# (layers, heads, latent side, text tokens) of the random pairs: large, then small
SHAPES = {
    "default": dict(large=(6, 9), small=(4, 6), latent=48, text_tokens=83, head_dim=64, joint=256, pooled=128),
    "tiny": dict(large=(2, 4), small=(2, 2), latent=16, text_tokens=16, head_dim=32, joint=64, pooled=32),
}

# argparse reads this, not __doc__ (None under python -OO)
DESCRIPTION = "Per-call latency of each exported graph on ONNX Runtime vs torch eager, and each masked bucket's cost."


def random_pair(root: str, shape: dict) -> tuple[str, str]:
    """Write an SD3-shaped random large/small pair (diffusers folders) under ``root``."""
    from diffusers import SD3Transformer2DModel

    from hybridstitch.scheduling import sd3_scheduler

    folders = []
    for role, seed in (("large", 0), ("small", 1)):
        layers, heads = shape[role]
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(
            sample_size=shape["latent"], patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
            attention_head_dim=shape["head_dim"], num_attention_heads=heads, joint_attention_dim=shape["joint"],
            caption_projection_dim=heads * shape["head_dim"], pooled_projection_dim=shape["pooled"],
            pos_embed_max_size=shape["latent"] // 2, qk_norm="rms_norm" if role == "large" else None,
        )
        folder = os.path.join(root, role)
        model.save_pretrained(os.path.join(folder, "transformer"))
        if role == "large":
            sd3_scheduler().save_pretrained(os.path.join(folder, "scheduler"))
        folders.append(folder)
    return folders[0], folders[1]


def torch_model(folder: str, role: str, dtype: torch.dtype):
    from hybridstitch.loading import load_transformer

    model = load_transformer(folder, role, dtype)
    return model if next(model.parameters()).dtype == dtype else model.to(dtype)


def pick_models(args, root: str) -> tuple[str, str, str, dict]:
    """(large, small, description, export sizes) for this run."""
    if args.large and args.small:
        return args.large, args.small, f"{args.large} + {args.small}", {}
    from hybridstitch.testbed import LARGE_DIR, SMALL_DIR

    if not args.tiny and all(os.path.isfile(os.path.join(d, "transformer", "config.json")) for d in (LARGE_DIR, SMALL_DIR)):
        return LARGE_DIR, SMALL_DIR, "the shipped testbed pair", {}
    shape = SHAPES["tiny" if args.tiny else "default"]
    large, small = random_pair(root, shape)
    px = shape["latent"] * 8  # no VAE in these folders: SD3's scale factor 8
    desc = (f"SD3-shaped random pair ({'tiny' if args.tiny else 'CPU-sized'}): large {shape['large'][0]} layers x "
            f"{shape['large'][1] * shape['head_dim']} wide, qk rms_norm; small {shape['small'][0]} layers x "
            f"{shape['small'][1] * shape['head_dim']} wide")
    return large, small, desc, dict(height=px, width=px, text_tokens=shape["text_tokens"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--tiny", action="store_true", help="tiny random models: a quick check of the script")
    ap.add_argument("--large", help="large checkpoint folder (default: the testbed pair, else a random pair)")
    ap.add_argument("--small", help="small checkpoint folder")
    ap.add_argument("--height", type=int, help="pixels (default: the models' sample size)")
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch", type=int, default=2, help="engine batch, CFG included (default 2)")
    ap.add_argument("--buckets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--engines", help="engine folder to export into / reuse (default: a temporary folder)")
    ap.add_argument("--out", help="output prefix (default benchmarks/results/engines[_tiny])")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from hybridstitch.engine.onnxruntime_backend import load_engines
    from hybridstitch.engine.torch_backend import TorchDenoiser
    from hybridstitch.export import ExportRequest, export_engines

    out = args.out or os.path.join(REPO, "benchmarks", "results", "engines_tiny" if args.tiny else "engines")
    with tempfile.TemporaryDirectory(prefix="hybridstitch-bench-") as tmp:
        large_dir, small_dir, desc, sizes = pick_models(args, tmp)
        if "height" not in sizes:
            from hybridstitch.export.request import vae_scale_factor_of
            from hybridstitch.loading import read_json, transformer_dir

            sample = read_json(os.path.join(transformer_dir(large_dir, "large"), "config.json"))["sample_size"]
            sizes = dict(height=sample * vae_scale_factor_of(large_dir), width=sample * vae_scale_factor_of(large_dir))
        height, width = args.height or sizes["height"], args.width or sizes["width"]
        engine_dir = args.engines or os.path.join(tmp, "engines")
        t0 = time.perf_counter()
        manifest = export_engines(
            ExportRequest(large=large_dir, small=small_dir, height=height, width=width, batch=args.batch,
                          buckets=tuple(args.buckets), precision=args.precision, text_tokens=sizes.get("text_tokens")),
            engine_dir,
        )
        export_seconds = time.perf_counter() - t0
        engines = load_engines(engine_dir, num_threads=1)
        dtype = torch.float16 if args.precision == "fp16" else torch.float32
        tl, ts = (TorchDenoiser(torch_model(folder, role, dtype), role) for folder, role in ((large_dir, "large"), (small_dir, "small")))

        b = manifest.batch
        lh, lw = manifest.latent_size
        n, t = manifest.tokens["image"], manifest.tokens["text"]
        spec = manifest.spec("large")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, spec.in_channels, lh, lw, generator=g)
        pe = torch.randn(b, t, spec.joint_attention_dim, generator=g)
        pooled = torch.randn(b, spec.pooled_projection_dim, generator=g)
        ts_in = torch.full((b,), 500.0)
        x_t, pe_t, pooled_t = x.to(dtype), pe.to(dtype), pooled.to(dtype)
        ort_cache, torch_cache = engines.large.new_cache(b, lh, lw), tl.new_cache(b, lh, lw)
        engines.large.forward(x, pe, pooled, ts_in, cache=ort_cache)
        tl.forward(x_t, pe_t, pooled_t, ts_in, cache=torch_cache)
        index = {}
        for bucket in manifest.buckets:
            k = bucket.masked_tokens
            index[bucket.graph] = torch.stack([torch.sort(torch.randperm(n, generator=g)[:k]).values for _ in range(b)])

        runs = {
            "small": (lambda: engines.small.forward(x, pe, pooled, ts_in), lambda: ts.forward(x_t, pe_t, pooled_t, ts_in)),
            "large": (lambda: engines.large.forward(x, pe, pooled, ts_in, cache=ort_cache),
                      lambda: tl.forward(x_t, pe_t, pooled_t, ts_in, cache=torch_cache)),
        }
        for name, idx in index.items():
            runs[name] = (lambda idx=idx: engines.large.forward_masked(x, pe, pooled, ts_in, idx, ort_cache),
                          lambda idx=idx: tl.forward_masked(x_t, pe_t, pooled_t, ts_in, idx, torch_cache))
        # Interleaved, every second round in reverse order so neither runtime always goes first.
        # The full large graphs come before the masked ones, so the warm-up fills both caches.
        timer = InterleavedTimer(reps=args.reps, warmup=1, alternate=True)
        for name, (ort_fn, torch_fn) in runs.items():
            timer.add((name, "onnxruntime"), ort_fn)
            timer.add((name, "torch"), torch_fn)
        timings = timer.run()
        times = {name: {b: timings[(name, b)].seconds for b in ("onnxruntime", "torch")} for name in runs}

    graphs = []
    for name in runs:
        o, tt = times[name]["onnxruntime"], times[name]["torch"]
        graphs.append(dict(graph=name, ort_ms_median=1e3 * statistics.median(o), torch_ms_median=1e3 * statistics.median(tt),
                           ort_over_torch=ratio_summary(o, tt)))
    buckets = []
    for bucket in manifest.buckets:
        name, k = bucket.graph, bucket.masked_tokens
        buckets.append(dict(
            graph=name, ratio=bucket.ratio, masked_tokens=k, ideal_fraction=(k + t) / (n + t),
            ort_cost=ratio_summary(times[name]["onnxruntime"], times["large"]["onnxruntime"]),
            torch_cost=ratio_summary(times[name]["torch"], times["large"]["torch"]),
        ))
    import onnxruntime

    info = machine_info(1)
    result = dict(
        date=info["date"][:10],
        machine=describe_machine(info),
        versions=dict(onnxruntime=onnxruntime.__version__, torch=torch.__version__),
        models=desc, precision=args.precision, batch=b, latent=[lh, lw], image_tokens=n, text_tokens=t,
        reps=args.reps, export_seconds=export_seconds, graphs=graphs, buckets=buckets,
    )
    md = [
        f"Engines on ONNX Runtime (CPU provider) vs torch eager: {desc}; {args.precision}, batch {b} (CFG included), "
        f"latent {lh}x{lw} (N={n} image + T={t} text tokens); {result['machine']}, {result['date']}; "
        f"median of {args.reps} interleaved reps "
        "(min-max).",
        "",
        "| graph | ORT / torch time | speed-up of ORT |",
        "|---|---|---|",
    ]
    for row in graphs:
        r = row["ort_over_torch"]
        md.append(f"| {row['graph']} | {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) | {1 / r['median']:.2f}x |")
    md += [
        "",
        "| bucket | k | ideal (k+T)/(N+T) | ORT cost / full large (min-max) | torch cost / full large (min-max) |",
        "|---|---|---|---|---|",
    ]
    for row in buckets:
        o, tc = row["ort_cost"], row["torch_cost"]
        md.append(f"| {row['ratio']:.0%} | {row['masked_tokens']} | {row['ideal_fraction']:.3f} | "
                  f"{o['median']:.3f} ({o['min']:.3f}-{o['max']:.3f}) | {tc['median']:.3f} ({tc['min']:.3f}-{tc['max']:.3f}) |")
    text = "\n".join(md)
    print(text)
    write_report(out, result, text)
    return result


if __name__ == "__main__":
    main()
