"""``hybridstitch serve`` and ``hybridstitch client``: arguments in, typed settings out, run.

The top-level CLI only registers these; errors surface as ``HybridStitchError`` and become its
one-line ``hybridstitch: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import threading

from ..errors import HybridStitchError
from .runner import GenerationRequest
from .settings import ModelSettings, ServerSettings

SERVE_HELP = "serve the method on Triton Inference Server (HTTP/gRPC, KServe v2 protocol), on loopback by default"
CLIENT_HELP = "send one request to a running hybridstitch serve and write the image"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    defaults = ServerSettings()
    what = p.add_argument_group("what to serve (one of)")
    what.add_argument("--engines", help="exported engines (hybridstitch-export --out DIR; hybridstitch demo writes DEMO/engines)")
    what.add_argument("--large", help="large diffusers checkpoint folder (torch backend, with --small)")
    what.add_argument("--small", help="small diffusers checkpoint folder (torch backend, with --large)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default=defaults.host, help="address to bind (default loopback; 0.0.0.0 for all interfaces)")
    net.add_argument("--http-port", type=int, default=defaults.http_port, help="0 picks a free port")
    net.add_argument("--grpc-port", type=int, default=defaults.grpc_port, help="0 picks a free port")
    net.add_argument("--metrics-port", type=int, default=defaults.metrics_port, help="Prometheus metrics; 0 picks a free port")
    batching = p.add_argument_group("batching and instances")
    batching.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                          help="requests Triton hands the model at once; also the requests an instance runs at once")
    batching.add_argument("--max-queue-delay-ms", type=float, default=defaults.max_queue_delay_ms,
                          help="how long Triton waits to fill a batch")
    batching.add_argument("--max-queue-size", type=int, default=defaults.max_queue_size,
                          help="requests waiting in Triton's queue; beyond it a request is refused at once")
    batching.add_argument("--instances", type=int, default=defaults.instances,
                          help="model instances (processes) per GPU on a GPU machine, else on the CPU; each loads the engines")
    batching.add_argument("--threads", type=int, default=None, help="CPU threads per instance (ONNX Runtime, torch)")
    req = p.add_argument_group("defaults for requests that omit them")
    req.add_argument("--method", default=GenerationRequest.method, help="preset name (see hybridstitch --list-presets)")
    req.add_argument("--steps", type=int, default=GenerationRequest.steps)
    req.add_argument("--guidance-scale", type=float, default=GenerationRequest.guidance_scale)
    p.add_argument("--log-file", default=None, help="write Triton's log here (default: to stderr once the server is up)")
    p.add_argument("--startup-timeout", type=float, default=defaults.startup_timeout_s, help="seconds to wait for the model to load")


def serve_settings_from_args(args) -> tuple[ModelSettings, ServerSettings]:
    server = ServerSettings(
        host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms, instances=args.instances,
        max_queue_size=args.max_queue_size, startup_timeout_s=args.startup_timeout, log_file=args.log_file,
    )
    model = ModelSettings(
        engines=args.engines, large=args.large, small=args.small, threads=args.threads,
        max_inflight=server.max_batch_size, method=args.method, steps=args.steps, guidance_scale=args.guidance_scale,
    )
    return model, server


def run_serve(model: ModelSettings, server: ServerSettings) -> int:
    """Serve until Ctrl-C or SIGTERM; then stop Triton and its model instances."""
    from .server import TritonServer

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        triton = TritonServer(model, server, echo_log=sys.stderr.write if server.log_file is None else None)
        try:
            e = triton.start(cancel=stop)
            if stop.is_set():
                return 0
            print(f"hybridstitch serve: model 'hybridstitch' ready on HTTP {e.http_url}, gRPC {e.grpc_url}, "
                  f"metrics {e.metrics_url} (Ctrl-C or SIGTERM stops it)", flush=True)
            while not stop.wait(0.5):
                if not triton.running:
                    raise HybridStitchError(
                        f"Triton Inference Server stopped by itself (exit code {triton.returncode}); see its log above"
                    )
        finally:
            triton.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("hybridstitch serve: stopped", flush=True)
    return 0


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP endpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="default: the server's")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the server's")
    p.add_argument("--method", default=None, help="preset name; default: the server's")
    p.add_argument("--out", default="image.png", help="PNG to write")
    p.add_argument("--trace", default=None, help="write the run's trace (JSON) here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the image")


def run_client(args) -> int:
    from ..fileio import atomic_write_bytes, atomic_write_text
    from .client import HybridStitchClient

    with HybridStitchClient(args.url, timeout_s=args.timeout) as client:
        image, trace = client.generate(args.prompt, args.seed, negative_prompt=args.negative_prompt, steps=args.steps,
                                       guidance_scale=args.guidance_scale, method=args.method)
    atomic_write_bytes(args.out, png_bytes(image))
    if args.trace:
        atomic_write_text(args.trace, json.dumps(trace, indent=2))
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]}), {trace['config']['name']}: "
          f"{trace['total_seconds']:.2f} s, stages {trace['stage_counts']}, switch steps {trace['switch_steps']}")
    return 0


def png_bytes(image) -> bytes:
    """uint8 [H, W, C] as PNG: C = 1 grayscale, 3 RGB, 4 RGBA."""
    from PIL import Image

    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if image.ndim != 3 or image.shape[2] not in modes:
        raise HybridStitchError(f"the server sent an image of shape {list(image.shape)}; expected [H, W, 1|3|4]")
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, modes[image.shape[2]]).save(buf, format="PNG")
    return buf.getvalue()
