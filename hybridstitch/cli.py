"""The ``hybridstitch`` command: generate, demo, calibrate, bench."""

from __future__ import annotations

import argparse
import math
import os
import sys

from .errors import HybridStitchError

# Read by argparse; a constant, not the module docstring, so ``python -OO`` (no docstrings) works.
DESCRIPTION = "The hybridstitch command: generate, demo, calibrate, bench."


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        # argparse's float() accepts "inf" and "nan": inf guidance gives a black image, NaN turns guidance off.
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1], got {value}")
    return value


DTYPE_NAMES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images with a large/small pair of local checkpoints")
    p.add_argument("--large", required=True,
                   help="large model (e.g. SD3.5 Large): a diffusers folder, a Hugging Face cache folder or snapshot, "
                        "a cached repo id, or a single .safetensors file")
    p.add_argument("--small", required=True, help="small model (e.g. SD3 Medium), in any form --large takes")
    p.add_argument("--large-config", default=None,
                   help="for a single-file --large: a local diffusers folder (or config.json) of the same model")
    p.add_argument("--small-config", default=None, help="for a single-file --small: as --large-config")
    p.add_argument("--conditioner", default=None,
                   help="folder with the text encoders and VAE (default: the large model's pipeline folder)")
    p.add_argument("--encoders", default="device", choices=["device", "cpu"],
                   help="where the text encoders run: with the transformers, or on the CPU")
    p.add_argument("--no-t5", action="store_true", help="drop the T5 text encoder (its tokens are zero-padded)")
    p.add_argument("--device", default="cpu", help="torch device of the transformers (e.g. cuda)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_NAMES),
                   help="auto: bfloat16 for SD3.5 on a CUDA GPU with bf16, float32 otherwise")
    p.add_argument("--method", default="hybridstitch-30", help="preset name (see --list-presets)")
    p.add_argument("--prompt", required=True, action="append", help="prompt; repeat for several")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=positive_int, default=28)
    p.add_argument("--guidance-scale", type=finite_float, default=7.0)
    p.add_argument("--height", type=positive_int, default=None)
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--engines", default=None, help="run on exported engines in this folder instead of torch")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch / ONNX Runtime")
    p.add_argument("--out", default="image.png", help="image path; several prompts get -0, -1, ... suffixes")
    p.add_argument("--trace", default=None, help="write the per-step trace as JSON here")
    p.add_argument("--no-progress", action="store_true")


def image_paths(out: str, count: int) -> list[str]:
    """Where ``count`` images go: ``out`` itself for one, ``<stem>-<i><ext>`` for several."""
    if count == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(count)]


def _generate(args) -> int:
    import io

    import torch

    from .config import StitchConfig
    from .fileio import atomic_write_bytes
    from .outputs import check_output_file
    from .pipeline import HybridStitchPipeline

    # Everything the command will write is checked before any model is loaded.
    config = StitchConfig.preset(args.method)
    paths = image_paths(args.out, len(args.prompt))
    for path in paths:
        check_output_file(path, "--out")
    if args.trace:
        check_output_file(args.trace, "--trace", "trace.json")
        if os.path.abspath(args.trace) in map(os.path.abspath, paths):
            raise HybridStitchError(f"--trace {args.trace} is also an image path; give the trace its own file")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPE_NAMES[args.dtype] and getattr(torch, DTYPE_NAMES[args.dtype])
    t5 = "none" if args.no_t5 else "load"
    if args.engines:
        if args.large_config or args.small_config:
            raise HybridStitchError("--large-config / --small-config are for checkpoints; engines carry their configs")
        pipe = HybridStitchPipeline.from_engines(args.engines, num_threads=args.threads,
                                                 conditioner_folder=args.conditioner, torch_dtype=dtype,
                                                 encoders=args.encoders, text_encoder_3=t5)
    else:
        pipe = HybridStitchPipeline.from_pretrained(
            large=args.large, small=args.small, torch_dtype=dtype, device=args.device,
            large_config=args.large_config, small_config=args.small_config, conditioner_folder=args.conditioner,
            encoders=args.encoders, text_encoder_3=t5,
        )
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
    for img, path in zip(out.images, paths):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        print(f"wrote {path}")
    if args.trace:
        if len(out.traces) == 1:
            out.trace.save(args.trace)
        else:  # one trace per image
            import json

            atomic_write_bytes(args.trace, json.dumps([t.to_dict() for t in out.traces], indent=1).encode())
        print(f"wrote {args.trace}")
    for t in out.traces:
        print(f"{config.name} image {t.sample}: {t.total_seconds:.2f} s, stages {t.stage_counts}, "
              f"switch steps {t.switch_steps}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the embedded demo: the shipped testbed pair on CPU, ONNX Runtime by default")
    p.add_argument("--out", default="hybridstitch-demo", help="output folder (images, traces, masks picture)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--method", default=None, help="HybridStitch preset to show (default: the calibrated testbed preset)")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--guidance-scale", type=finite_float, default=1.25, help="1.25 gives the testbed its best FD")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--threads", type=positive_int, default=1)
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


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line and exit status 2, like every other error of the
    command (subcommand parsers are made of the same class)."""

    def error(self, message: str):
        self.exit(2, f"hybridstitch: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hybridstitch", description=DESCRIPTION)
    parser.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    sub = parser.add_subparsers(dest="command")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
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
