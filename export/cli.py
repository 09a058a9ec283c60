"""``hybridstitch-export``: build the engine set of a large/small pair for one resolution and batch.

    hybridstitch-export --large DIR --small DIR --height 768 --width 768 --batch 2 \\
        --buckets 0.1 0.2 0.3 0.4 --backend onnxruntime --precision fp32 --out ENGINE_DIR

    # on the GPU machine that will serve them: TensorRT engines for this GPU and TensorRT version
    hybridstitch-export ... --backend tensorrt --precision fp16 [--attention plugin|standard] \\
        [--compiler onnx|torch-tensorrt] [--builder-optimization-level 0-5] \\
        [--hardware-compatibility none|ampere_plus|same_compute_capability] --out ENGINE_DIR

Rerunning the same command resumes an interrupted export (valid engines are skipped) and
rebuilds only engines whose files are missing or damaged. One export at a time writes a folder
(a second is refused, or waits with ``--wait SECONDS``); ``--overwrite`` builds a replacement
beside the folder and swaps it in when complete. Exit status 0 on success, 2 on a user error
(printed as one line that says what to do), 1 on an unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from hybridstitch.errors import HybridStitchError


TENSORRT_FLAGS = ("compiler", "attention", "builder_optimization_level", "hardware_compatibility", "timing_cache",
                  "verify")


def _fp32_blocks(values: list[str] | None):
    """``auto`` (None), ``none`` (()) or block indices."""
    if values is None or values == ["auto"]:
        return None
    if values == ["none"]:
        return ()
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise HybridStitchError(f"--fp32-blocks takes auto, none or block indices, got {' '.join(values)}") from None


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line and exit status 2, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from hybridstitch.engine.builds import ATTENTIONS, COMPILERS, HARDWARE_COMPATIBILITY, VERIFY

    from .request import BACKENDS, BF16_MIN_OPSET, DEFAULT_BUCKETS, DEFAULT_OPSET, MIN_OPSET

    ap = Parser(
        prog="hybridstitch-export",
        description="Export a large/small SD3-family pair to engines: the full small transformer, the full large "
        "transformer with its KV cache, and one masked large transformer per mask-ratio bucket.",
    )
    ap.add_argument("--large", required=True, help="the large model's local diffusers folder (e.g. SD3.5 Large)")
    ap.add_argument("--small", required=True, help="the small model's local diffusers folder (e.g. SD3 Medium)")
    ap.add_argument("--height", type=int, required=True, help="image height in pixels")
    ap.add_argument("--width", type=int, required=True, help="image width in pixels")
    ap.add_argument("--batch", type=int, default=2,
                    help="engine batch, CFG included: 1 image with guidance is 2 (default 2)")
    ap.add_argument("--buckets", type=float, nargs="+", default=list(DEFAULT_BUCKETS),
                    help="mask-ratio buckets, one masked engine each (default 0.1 0.2 0.3 0.4)")
    ap.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                    help="onnxruntime (ONNX graphs, any machine) or tensorrt (engines for this machine's GPU)")
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                    help="graph precision; bf16 is for --backend tensorrt only (default fp32)")
    ap.add_argument("--opset", type=int, default=None,
                    help=f"ONNX opset, from {MIN_OPSET} to the newest the exporter writes and ONNX Runtime runs "
                    f"(23 with torch 2.13) (default {DEFAULT_OPSET}; {BF16_MIN_OPSET} for bf16)")
    ap.add_argument("--fp32-blocks", nargs="+", default=None, metavar="auto|none|I",
                    help="large-model blocks kept in float32 in fp16/bf16 graphs (default auto: block 35 of SD3.5 "
                    "Large in fp16, as TensorRT's SD3.5 demo)")
    ap.add_argument("--text-tokens", type=int, default=None,
                    help="text tokens of the conditioning (default: from the large folder; SD3's CLIP+T5 is 333)")
    ap.add_argument("--out", default=None, help="the engine folder to write (created if needed); not needed with --plan")
    plan = ap.add_argument_group("memory plan")
    plan.add_argument("--plan", action="store_true",
                      help="print the memory budget of the engine set (weights, KV caches, activations, encoders, runtime) "
                      "and whether it fits, without building anything; works on folders holding only configs")
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                      help="the GPU memory to plan for: --plan exits 2 when the set does not fit; an export refuses "
                      "before writing anything (default with --plan: this machine's GPU when one is visible)")
    plan.add_argument("--encoders", choices=("gpu", "cpu", "none"), default="gpu",
                      help="where the text encoders and VAE will run, for the plan (default gpu)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a folder that holds engines of another configuration: the new set is built beside "
                    "it and swapped in when complete (until then the old engines stay loadable)")
    ap.add_argument("--wait", type=seconds, default=0.0, metavar="SECONDS",
                    help="when another export is writing the same folder, wait up to this long for it (default 0: "
                    "refuse at once)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars, no warnings from the ONNX exporter")
    trt = ap.add_argument_group("TensorRT (--backend tensorrt)")
    trt.add_argument("--compiler", choices=COMPILERS, default=None,
                     help="onnx: build from the ONNX graphs with Polygraphy (default); torch-tensorrt: compile the "
                     "torch graphs with Torch-TensorRT")
    trt.add_argument("--attention", choices=ATTENTIONS, default=None,
                     help="plugin: the CachedKVAttention plugin (default); standard: standard ops, TensorRT's own "
                     "attention fusion")
    trt.add_argument("--builder-optimization-level", type=int, default=None, choices=range(6), metavar="0-5",
                     help="TensorRT builder optimisation level (default: TensorRT's, 3)")
    trt.add_argument("--hardware-compatibility", choices=HARDWARE_COMPATIBILITY, default=None,
                     help="none: engines for this GPU's compute capability (default); ampere_plus: any GPU of "
                     "compute capability >= 8.0; same_compute_capability")
    trt.add_argument("--timing-cache", default=None, metavar="PATH",
                     help="TensorRT timing cache (default: one per GPU and TensorRT version in the engine folder)")
    trt.add_argument("--verify", choices=VERIFY, default=None,
                     help="onnxruntime: check each ONNX graph against torch before building from it (default); none")
    return ap


def _plan(req) -> int:
    """Print the memory plan; exit 0 when it fits (or no capacity is known), else raise with what to change."""
    from .memory_plan import check_fits, plan_for_request

    plan = plan_for_request(req, req.encoders)
    capacity = req.gpu_memory_gb
    if capacity is None and plan.device == "gpu":
        capacity = _visible_gpu_gb()
    print(plan.render(capacity))
    if capacity is not None:
        check_fits(plan, capacity)
    return 0


def _visible_gpu_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1e9


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        from hybridstitch.engine.builds import TensorRTOptions

        from .driver import export_engines
        from .request import BF16_MIN_OPSET, DEFAULT_OPSET, ExportRequest

        given = {f: getattr(args, f) for f in TENSORRT_FLAGS if getattr(args, f) is not None}
        if given and args.backend != "tensorrt":
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise HybridStitchError(f"{flags} apply to --backend tensorrt only")
        opset = args.opset if args.opset is not None else (BF16_MIN_OPSET if args.precision == "bf16" else DEFAULT_OPSET)
        req = ExportRequest(
            large=args.large, small=args.small, height=args.height, width=args.width, batch=args.batch,
            buckets=tuple(args.buckets), precision=args.precision, backend=args.backend, opset=opset,
            text_tokens=args.text_tokens, overwrite=args.overwrite, fp32_blocks=_fp32_blocks(args.fp32_blocks),
            tensorrt=TensorRTOptions(**given) if args.backend == "tensorrt" else None,
            gpu_memory_gb=args.gpu_memory, encoders=args.encoders,
        )
        if args.plan:
            return _plan(req)
        if args.out is None:
            raise HybridStitchError("--out is required: the engine folder to write (or --plan to only plan)")
        manifest = export_engines(req, args.out, progress=not args.quiet, quiet=args.quiet, wait=args.wait)
    except HybridStitchError as e:
        print(f"hybridstitch-export: error: {e}", file=sys.stderr)
        return 2
    summary = dict(
        out=args.out, engines=sorted(manifest.graphs), buckets=[vars(b) for b in manifest.buckets], precision=manifest.precision,
        batch=manifest.batch, resolution=manifest.resolution, tokens=manifest.tokens,
    )
    if manifest.tensorrt:
        summary["tensorrt_builds"] = sorted(manifest.tensorrt.get("builds", {}))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
