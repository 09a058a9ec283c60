"""The ``hybridstitch`` command: generate, demo, calibrate, bench."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import HybridStitchError

# Read by argparse; a constant, not the module docstring, so ``python -OO`` (no docstrings) works.
DESCRIPTION = "The hybridstitch command: generate, demo, calibrate, bench."


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images with a large/small pair of local diffusers checkpoints")
    p.add_argument("--large", required=True, help="large model folder (diffusers pipeline folder, e.g. SD3.5 Large)")
    p.add_argument("--small", required=True, help="small model folder (e.g. SD3 Medium)")
    p.add_argument("--method", default="hybridstitch-30", help="preset name (see --list-presets)")
    p.add_argument("--prompt", required=True, action="append", help="prompt; repeat for several")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance-scale", type=float, default=7.0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default=None, help="run on exported engines in this folder instead of torch")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch / ONNX Runtime")
    p.add_argument("--out", default="image.png", help="image path; several prompts get -0, -1, ... suffixes")
    p.add_argument("--trace", default=None, help="write the per-step trace as JSON here")
    p.add_argument("--no-progress", action="store_true")


def _generate(args) -> int:
    import torch

    from .config import StitchConfig
    from .fileio import atomic_write_bytes
    from .pipeline import HybridStitchPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    config = StitchConfig.preset(args.method)
    if args.engines:
        pipe = HybridStitchPipeline.from_engines(args.engines, num_threads=args.threads)
    else:
        pipe = HybridStitchPipeline.from_pretrained(large=args.large, small=args.small)
    out = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        config=config,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        generator=torch.Generator().manual_seed(args.seed),
        progress=not args.no_progress,
    )
    paths = [args.out] if len(out.images) == 1 else [
        "{}-{}{}".format(os.path.splitext(args.out)[0], i, os.path.splitext(args.out)[1] or ".png") for i in range(len(out.images))
    ]
    import io

    for img, path in zip(out.images, paths):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        print(f"wrote {path}")
    if args.trace:
        out.trace.save(args.trace)
        print(f"wrote {args.trace}")
    t = out.trace
    print(f"{config.name}: {t.total_seconds:.2f} s, stages {t.stage_counts}, switch steps {t.switch_steps}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the embedded demo: the shipped testbed pair on CPU, ONNX Runtime by default")
    p.add_argument("--out", default="hybridstitch-demo", help="output folder (images, traces, masks picture)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--method", default=None, help="HybridStitch preset to show (default: the calibrated testbed preset)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=1.25, help="1.25 gives the testbed its best FD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, backend=args.backend, method=args.method, steps=args.steps,
             guidance_scale=args.guidance_scale, seed=args.seed, threads=args.threads, progress=not args.no_progress)
    return 0


def _add_bench(sub) -> None:
    from .bench import latency

    p = sub.add_parser("bench", help="latency benchmark of every method on every available backend",
                       description=latency.DESCRIPTION)
    latency.add_arguments(p)


def _bench(args) -> int:
    from .bench import latency

    latency.run(latency.settings_from_args(args))
    return 0


def _add_calibrate(sub) -> None:
    from .testbed import calibrate

    p = sub.add_parser("calibrate", help="sweep thresholds and mask ratios on the testbed: latency, quality, Pareto front")
    calibrate.add_arguments(p)


def _calibrate(args) -> int:
    from .testbed import calibrate

    calibrate.run(calibrate.settings_from_args(args))
    return 0


def _add_serve(sub) -> None:
    from .serve import cli as serve_cli

    p = sub.add_parser("serve", help=serve_cli.SERVE_HELP, description=serve_cli.SERVE_HELP)
    serve_cli.add_serve_arguments(p)


def _serve(args) -> int:
    from .serve import cli as serve_cli

    return serve_cli.run_serve(*serve_cli.serve_settings_from_args(args))


def _add_client(sub) -> None:
    from .serve import cli as serve_cli

    p = sub.add_parser("client", help=serve_cli.CLIENT_HELP, description=serve_cli.CLIENT_HELP)
    serve_cli.add_client_arguments(p)


def _client(args) -> int:
    from .serve import cli as serve_cli

    return serve_cli.run_client(args)


# command -> (add its parser, run it)
COMMANDS = {
    "generate": (_add_generate, _generate),
    "demo": (_add_demo, _demo),
    "bench": (_add_bench, _bench),
    "calibrate": (_add_calibrate, _calibrate),
    "serve": (_add_serve, _serve),
    "client": (_add_client, _client),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridstitch", description=DESCRIPTION)
    parser.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    sub = parser.add_subparsers(dest="command")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        from .config import StitchConfig

        print("\n".join(StitchConfig.preset_names()))
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][1](args)
    except HybridStitchError as e:
        print(f"hybridstitch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
