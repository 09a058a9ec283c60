"""Per-call cost of the exported graphs on ONNX Runtime: the one shared large graph (every mask
ratio and the full step) against the layout it replaced (a dedicated full graph and one static
graph per bucket, each with its own copy of the weights), against the ideal token fraction, and
against torch eager.

Exports the engine set of a large/small pair (``hybridstitch-export``'s code path) and, beside
it, the reference graphs of the old layout from the same torch modules (``FullLargeGraph``, and
``MaskedLargeGraph`` at a fixed k per bucket); loads the engine set on ONNX Runtime (CPU provider)
and the same checkpoints in torch; times every call with one thread, interleaved repetitions
(every second rep in reverse order; :mod:`hybridstitch.bench.timer`), medians of per-rep ratios
with min-max. Reported:

* the full step: the shared graph at k = N (every position) / the dedicated full graph (the
  goal: at most 1.03);
* per bucket: the shared graph at k / the full step, next to the static per-bucket graph / the
  full step and the ideal ``(k + T) / (N + T)``;
* ONNX Runtime / torch eager per call;
* the files: the shared layout's large graph vs the old layout's (full + buckets).

Models, in order of preference:

* ``--large DIR --small DIR``: your checkpoints;
* the shipped testbed pair (``hybridstitch/testbed/weights/{large,small}``) when present;
* else an SD3-shaped random pair at CPU size: SD3.5-Large-like (qk rms_norm) scaled to width
  576 (9 x 64), 6 layers, a 48x48 latent (N = 576) and T = 83 text tokens, with an SD3-Medium-like
  small (no qk-norm, width 384, 4 layers); ``--tiny`` shrinks both to a quick check.

    python benchmarks/engines.py [--tiny] [--random] [--reps 7] [--out benchmarks/results/engines]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from hybridstitch.bench.machine import describe_machine, machine_info
from hybridstitch.bench.report import write_report
from hybridstitch.bench.timer import InterleavedTimer, ratio_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Read by argparse; a constant, not the module docstring, so ``python -OO`` (no docstrings) works.
DESCRIPTION = ("Per-call cost of the shared large graph (every ratio and the full step) vs the old per-bucket graphs, "
               "the ideal token fraction and torch eager.")

# (layers, heads, latent side, text tokens) of the random pairs: large, then small
SHAPES = {
    "default": dict(large=(6, 9), small=(4, 6), latent=48, text_tokens=83, head_dim=64, joint=256, pooled=128),
    "tiny": dict(large=(2, 4), small=(2, 2), latent=16, text_tokens=16, head_dim=32, joint=64, pooled=32),
}

# argparse reads this, not __doc__ (None under python -OO)
DESCRIPTION = ("Per-call cost of the shared large graph (every ratio and the full step) vs the old per-bucket graphs, "
               "the ideal token fraction and torch eager.")


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

    if not (args.tiny or args.random) and all(os.path.isfile(os.path.join(d, "transformer", "config.json"))
                                              for d in (LARGE_DIR, SMALL_DIR)):
        return LARGE_DIR, SMALL_DIR, "the shipped testbed pair", {}
    shape = SHAPES["tiny" if args.tiny else "default"]
    large, small = random_pair(root, shape)
    px = shape["latent"] * 8  # no VAE in these folders: SD3's scale factor 8
    desc = (f"SD3-shaped random pair ({'tiny' if args.tiny else 'CPU-sized'}): large {shape['large'][0]} layers x "
            f"{shape['large'][1] * shape['head_dim']} wide, qk rms_norm; small {shape['small'][0]} layers x "
            f"{shape['small'][1] * shape['head_dim']} wide")
    return large, small, desc, dict(height=px, width=px, text_tokens=shape["text_tokens"])


def export_reference(module, kind: str, spec, shapes, k: int | None, folder: str, name: str) -> str:
    """One graph of the layout before one-copy engines: static shapes, its own weights. Returns its path."""
    from hybridstitch.export.graphs import example_inputs, io_shapes
    from hybridstitch.export.onnx_steps import FilesFromOnnx, OnnxFromGraph

    ins, outs = io_shapes(kind, spec, shapes, k, symbolic=False)
    example = example_inputs(kind, spec, shapes, torch.float32, k)
    model = OnnxFromGraph(module, [n for n, _, _ in ins], [n for n, _, _ in outs], example, 18)()
    FilesFromOnnx(model, folder, name)()
    return os.path.join(folder, f"{name}.onnx")


def session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def folder_mb(folder: str, prefixes) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith(prefixes)) / 1e6


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--tiny", action="store_true", help="tiny random models: a quick check of the script")
    ap.add_argument("--random", action="store_true", help="the CPU-sized SD3-shaped random pair even if the testbed is there")
    ap.add_argument("--large", help="large checkpoint folder (default: the testbed pair, else a random pair)")
    ap.add_argument("--small", help="small checkpoint folder")
    ap.add_argument("--height", type=int, help="pixels (default: the models' sample size)")
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch", type=int, default=2, help="batch, CFG included (default 2)")
    ap.add_argument("--buckets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", help="output prefix (default benchmarks/results/engines[_tiny])")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from hybridstitch.engine.onnxruntime_backend import load_engines
    from hybridstitch.engine.torch_backend import TorchDenoiser
    from hybridstitch.export import ExportRequest, export_engines
    from hybridstitch.export.graphs import FullLargeGraph, GraphShapes, MaskedLargeGraph
    from hybridstitch.masks import tokens_for_ratio

    out = args.out or os.path.join(REPO, "benchmarks", "results", "engines_tiny" if args.tiny else "engines")
    with tempfile.TemporaryDirectory(prefix="hybridstitch-bench-") as tmp:
        large_dir, small_dir, desc, sizes = pick_models(args, tmp)
        if "height" not in sizes:
            from hybridstitch.export.request import vae_scale_factor_of
            from hybridstitch.loading import read_json, transformer_dir

            sample = read_json(os.path.join(transformer_dir(large_dir, "large"), "config.json"))["sample_size"]
            sizes = dict(height=sample * vae_scale_factor_of(large_dir), width=sample * vae_scale_factor_of(large_dir))
        height, width = args.height or sizes["height"], args.width or sizes["width"]
        engine_dir = os.path.join(tmp, "engines")
        t0 = time.perf_counter()
        manifest = export_engines(
            ExportRequest(large=large_dir, small=small_dir, height=height, width=width, batch=args.batch,
                          buckets=tuple(args.buckets), text_tokens=sizes.get("text_tokens")),
            engine_dir, progress=False,
        )
        export_seconds = time.perf_counter() - t0
        engines = load_engines(engine_dir, num_threads=1)
        tl, ts = (TorchDenoiser(torch_model(folder, role, torch.float32), role)
                  for folder, role in ((large_dir, "large"), (small_dir, "small")))
        b = args.batch
        lh, lw = manifest.latent_size
        n, t = manifest.tokens["image"], manifest.tokens["text"]
        spec = manifest.spec("large")
        shapes = GraphShapes(b, lh, lw, t)

        # the old layout, from the same modules: a dedicated full graph and a static graph per bucket
        old_dir = os.path.join(tmp, "old")
        os.makedirs(old_dir)
        ks = {r: tokens_for_ratio(r, n) for r in args.buckets}
        full_path = export_reference(FullLargeGraph(tl), "full_large", spec, shapes, None, old_dir, "large_full")
        static = {r: session(export_reference(MaskedLargeGraph(tl), "large", spec, shapes, k, old_dir,
                                              f"large_masked_{r * 100:g}")) for r, k in ks.items()}
        full_session = session(full_path)

        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, spec.in_channels, lh, lw, generator=g)
        pe = torch.randn(b, t, spec.joint_attention_dim, generator=g)
        pooled = torch.randn(b, spec.pooled_projection_dim, generator=g)
        ts_in = torch.full((b,), 500.0)
        _, ort_cache = engines.large.forward_store(x, pe, pooled, ts_in)
        _, torch_cache = tl.forward_store(x, pe, pooled, ts_in)
        index = {r: torch.stack([torch.sort(torch.randperm(n, generator=g)[:k]).values for _ in range(b)])
                 for r, k in ks.items()}
        feeds_full = {"latents": x.numpy(), "prompt_embeds": pe.numpy(), "pooled": pooled.numpy(), "timestep": ts_in.numpy()}
        full_out = full_session.run(None, feeds_full)  # the dedicated graph's caches feed the static ones
        cache_feeds = {name: arr for name, arr in zip([o.name for o in full_session.get_outputs()][1:], full_out[1:])}

        runs = {
            ("small", "onnxruntime"): lambda: engines.small.forward(x, pe, pooled, ts_in),
            ("small", "torch"): lambda: ts.forward(x, pe, pooled, ts_in),
            ("full", "shared"): lambda: engines.large.forward_store(x, pe, pooled, ts_in),
            ("full", "dedicated"): lambda: full_session.run(None, feeds_full),
            ("full", "torch"): lambda: tl.forward_store(x, pe, pooled, ts_in),
        }
        for r, idx in index.items():
            runs[(r, "shared")] = lambda idx=idx: engines.large.forward_masked(x, pe, pooled, ts_in, idx, ort_cache)
            runs[(r, "static")] = lambda r=r, idx=idx: static[r].run(None, {**feeds_full, "index": idx.numpy(), **cache_feeds})
            runs[(r, "torch")] = lambda idx=idx: tl.forward_masked(x, pe, pooled, ts_in, idx, torch_cache)
        timer = InterleavedTimer(reps=args.reps, warmup=1, alternate=True)
        for key, fn in runs.items():
            timer.add(key, fn)
        timings = timer.run()
        sec = {key: timings[key].seconds for key in runs}
        files = dict(shared_large_mb=folder_mb(engine_dir, ("large.onnx",)),
                     old_large_mb=folder_mb(old_dir, ("large_",)), checkpoint_mb=sum(
                         p.numel() * 4 for p in tl.model.parameters()) / 1e6)

    full = dict(shared_over_dedicated=ratio_summary(sec[("full", "shared")], sec[("full", "dedicated")]),
                shared_over_torch=ratio_summary(sec[("full", "shared")], sec[("full", "torch")]))
    buckets = []
    for r, k in ks.items():
        buckets.append(dict(
            ratio=r, masked_tokens=k, ideal_fraction=(k + t) / (n + t),
            shared_cost=ratio_summary(sec[(r, "shared")], sec[("full", "dedicated")]),
            static_cost=ratio_summary(sec[(r, "static")], sec[("full", "dedicated")]),
            shared_over_static=ratio_summary(sec[(r, "shared")], sec[(r, "static")]),
            shared_over_torch=ratio_summary(sec[(r, "shared")], sec[(r, "torch")]),
        ))
    small = ratio_summary(sec[("small", "onnxruntime")], sec[("small", "torch")])
    import onnxruntime

    info = machine_info(1)
    result = dict(
        date=info["date"][:10], machine=describe_machine(info),
        versions=dict(onnxruntime=onnxruntime.__version__, torch=torch.__version__),
        models=desc, precision="fp32", batch=b, latent=[lh, lw], image_tokens=n, text_tokens=t, reps=args.reps,
        export_seconds=export_seconds, full_step=full, buckets=buckets, small_ort_over_torch=small, files=files,
    )

    def cell(st):
        return f"{st['median']:.3f} ({st['min']:.3f}-{st['max']:.3f})"

    md = [
        f"ONNX Runtime (CPU provider), fp32: {desc}; batch {b} (CFG included), latent {lh}x{lw} (N={n} image + "
        f"T={t} text tokens); {result['machine']}, {result['date']}; median of {args.reps} interleaved reps (min-max).",
        "",
        f"Full step: the shared graph at k = N / the dedicated full graph = {cell(full['shared_over_dedicated'])} "
        f"(goal <= 1.03); / torch eager {cell(full['shared_over_torch'])}. Small graph / torch eager {cell(small)}.",
        "",
        "| bucket | k | ideal (k+T)/(N+T) | shared graph / full | static graph / full (old layout) | shared / static | "
        "shared / torch eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in buckets:
        md.append(f"| {row['ratio']:.0%} | {row['masked_tokens']} | {row['ideal_fraction']:.3f} | "
                  f"{cell(row['shared_cost'])} | {cell(row['static_cost'])} | {cell(row['shared_over_static'])} | "
                  f"{cell(row['shared_over_torch'])} |")
    md += ["", f"Files: the shared large graph {files['shared_large_mb']:.1f} MB (checkpoint {files['checkpoint_mb']:.1f} MB "
           f"at fp32); the old layout's large graphs (full + {len(ks)} buckets) {files['old_large_mb']:.1f} MB."]
    text = "\n".join(md)
    print(text)
    write_report(out, result, text)
    return result


if __name__ == "__main__":
    main()
