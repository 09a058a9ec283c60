"""``hybridstitch-export``: build the engine set of a large/small pair for one resolution and batch.

    hybridstitch-export --large DIR --small DIR --height 768 --width 768 --batch 2 \\
        --buckets 0.1 0.2 0.3 0.4 --backend onnxruntime --precision fp32 --out ENGINE_DIR

Rerunning the same command resumes an interrupted export (valid engines are skipped) and
rebuilds only engines whose files are missing or damaged. Exit status 0 on success, 2 on a
user error (printed as one line that says what to do), 1 on an unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from hybridstitch.errors import HybridStitchError


def build_parser() -> argparse.ArgumentParser:
    from .onnx_export import BACKENDS, DEFAULT_BUCKETS, DEFAULT_OPSET

    ap = argparse.ArgumentParser(
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
    ap.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 18 (default {DEFAULT_OPSET})")
    ap.add_argument("--text-tokens", type=int, default=None,
                    help="text tokens of the conditioning (default: from the large folder; SD3's CLIP+T5 is 333)")
    ap.add_argument("--out", required=True, help="the engine folder to write (created if needed)")
    ap.add_argument("--overwrite", action="store_true",
                    help="rebuild a folder that holds engines of another configuration")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .onnx_export import ExportRequest, export_engines

        req = ExportRequest(
            large=args.large, small=args.small, height=args.height, width=args.width, batch=args.batch,
            buckets=tuple(args.buckets), precision=args.precision, backend=args.backend, opset=args.opset,
            text_tokens=args.text_tokens, overwrite=args.overwrite,
        )
        manifest = export_engines(req, args.out, progress=not args.quiet)
    except HybridStitchError as e:
        print(f"hybridstitch-export: error: {e}", file=sys.stderr)
        return 2
    summary = dict(
        out=args.out, engines=sorted(manifest.graphs), buckets=manifest.buckets, precision=manifest.precision,
        batch=manifest.batch, resolution=manifest.resolution, tokens=manifest.tokens,
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
