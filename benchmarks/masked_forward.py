"""Masked large forward vs full forward on a CPU-sized SD3.5-Large-shaped transformer.

Scales SD3.5 Large's shape uniformly by 1/4 so the costs keep their real proportions:
768x768 has N = 2304 image tokens, T = 333 text tokens and width 2432 (38 x 64); here
N = 576 (a 48x48 latent), T = 83 and width 576 (9 x 64), so per-token linear cost (~d^2) and
attention cost (~(N+T) d) keep the real ratio. qk rms_norm as in SD3.5 Large.

One thread, interleaved repetitions (full, 10 %, 20 %, ... in turn), median ratio to the full
forward with min-max, next to the ideal token fraction (k + T) / (N + T). Writes JSON + Markdown.

    python benchmarks/masked_forward.py [--layers 6] [--reps 7] [--out benchmarks/results/masked_forward]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from hybridstitch.bench.machine import describe_machine, machine_info
from hybridstitch.bench.report import write_report
from hybridstitch.bench.timer import InterleavedTimer, ratio_summary

# Read by argparse; a constant, not the module docstring, so ``python -OO`` (no docstrings) works.
DESCRIPTION = "Masked large forward vs full forward on a CPU-sized SD3.5-Large-shaped transformer."


def build(layers: int, heads: int, latent: int, text_tokens: int, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    from hybridstitch.engine.torch_backend import TorchDenoiser

    torch.manual_seed(seed)
    dim = heads * 64
    model = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=256, caption_projection_dim=dim,
        pooled_projection_dim=128, pos_embed_max_size=latent // 2, qk_norm="rms_norm",
    )
    g = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(2, 16, latent, latent, generator=g),  # CFG batch 2
        torch.randn(2, text_tokens, 256, generator=g),
        torch.randn(2, 128, generator=g),
        torch.full((2,), 500.0),
    )
    return TorchDenoiser(model.eval(), "large"), inputs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--latent", type=int, default=48)
    ap.add_argument("--text-tokens", type=int, default=83)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/masked_forward")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    den, (x, enc, pooled, t) = build(args.layers, args.heads, args.latent, args.text_tokens)
    n = (args.latent // 2) ** 2
    _, caches = den.forward_store(x, enc, pooled, t)
    idx = {r: torch.sort(torch.randperm(n)[: math.ceil(r * n)]).values[None].repeat(2, 1) for r in args.ratios}

    def run_full():
        den.forward_store(x, enc, pooled, t)

    def run_masked(r):
        den.forward_masked(x, enc, pooled, t, idx[r], caches)

    timer = InterleavedTimer(reps=args.reps, warmup=1)
    timer.add("full", run_full)
    for r in dict.fromkeys(args.ratios):
        timer.add(r, lambda r=r: run_masked(r))
    times = {key: t.seconds for key, t in timer.run().items()}

    rows = []
    for r in args.ratios:
        k = math.ceil(r * n)
        cost = ratio_summary(times[r], times["full"])
        rows.append(dict(
            ratio=r, masked_tokens=k, ideal_fraction=(k + args.text_tokens) / (n + args.text_tokens),
            cost_median=cost["median"], cost_min=cost["min"], cost_max=cost["max"],
            speedup_median=1.0 / cost["median"],
        ))
    info = machine_info(1)
    result = dict(
        date=info["date"][:10], machine=describe_machine(info),
        model=dict(layers=args.layers, heads=args.heads, width=args.heads * 64, image_tokens=n, text_tokens=args.text_tokens, batch=2),
        reps=args.reps, full_seconds_median=statistics.median(times["full"]), rows=rows,
    )
    md = [
        f"Masked forward vs full, SD3.5-Large-shaped at 1/4 scale ({args.layers} layers, width {args.heads * 64}, "
        f"N={n} image + T={args.text_tokens} text tokens, CFG batch 2), {result['machine']}, {result['date']}, "
        f"median of {args.reps} interleaved reps.",
        "",
        "| mask ratio | k | ideal (k+T)/(N+T) | measured cost / full (min-max) | speed-up |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        md.append(f"| {row['ratio']:.0%} | {row['masked_tokens']} | {row['ideal_fraction']:.3f} | "
                  f"{row['cost_median']:.3f} ({row['cost_min']:.3f}-{row['cost_max']:.3f}) | {row['speedup_median']:.2f}x |")
    text = "\n".join(md)
    print(text)
    write_report(args.out, result, text)
    return result


if __name__ == "__main__":
    main()
