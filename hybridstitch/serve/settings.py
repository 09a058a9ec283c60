"""Typed settings of ``hybridstitch serve``: what each model instance loads and how Triton serves it.

Checked when made, with messages that say how to fix them; the CLI turns its arguments into
these at the edge and nothing deeper sees argparse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from ..errors import HybridStitchError
from .runner import GenerationRequest

PORT_MAX = 65535


@dataclass(frozen=True)
class ModelSettings:
    """What one model instance loads (``engines``, or the ``large`` and ``small`` diffusers folders
    for the torch backend) and the defaults for the optional request inputs."""

    engines: str | None = None
    large: str | None = None
    small: str | None = None
    threads: int | None = None  # CPU threads per instance (ONNX Runtime and torch); None: their defaults
    max_inflight: int = 4  # requests an instance holds in its runner at once; more wait in Triton's queue
    method: str = GenerationRequest.method
    steps: int = GenerationRequest.steps
    guidance_scale: float = GenerationRequest.guidance_scale

    def __post_init__(self):
        if (self.engines is None) == (self.large is None and self.small is None):
            raise HybridStitchError("serve exported engines (--engines DIR) or a checkpoint pair (--large DIR --small DIR), not both")
        if self.engines is None and (self.large is None or self.small is None):
            raise HybridStitchError("the torch backend needs both --large DIR and --small DIR")
        for name in ("engines", "large", "small"):
            folder = getattr(self, name)
            if folder is not None and not os.path.isdir(folder):
                raise HybridStitchError(f"--{name} {folder!r} is not a folder" + (
                    f"; export engines with hybridstitch-export --out {folder} (or run hybridstitch demo)"
                    if name == "engines" else "; pass a local diffusers checkpoint folder"))
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise HybridStitchError(f"--threads must be a positive integer, got {self.threads!r}")
        if not isinstance(self.max_inflight, int) or self.max_inflight < 1:
            raise HybridStitchError(f"max_inflight must be a positive integer, got {self.max_inflight!r}")
        # The request defaults must make a valid request themselves.
        GenerationRequest(prompt="", seed=0, steps=self.steps, guidance_scale=self.guidance_scale, method=self.method)

    @property
    def request_defaults(self) -> dict:
        return {"method": self.method, "steps": self.steps, "guidance_scale": self.guidance_scale}

    def with_absolute_paths(self) -> "ModelSettings":
        """The instances run with another working directory (Triton's), so folders are made absolute."""
        return dataclasses.replace(self, **{n: os.path.abspath(getattr(self, n)) for n in ("engines", "large", "small")
                                            if getattr(self, n) is not None})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelSettings":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ServerSettings:
    """How Triton serves the model. Ports 0 mean "pick a free one" (the chosen ports are reported
    by the running server)."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = 4
    max_queue_delay_ms: float = 10.0
    instances: int = 1  # per GPU on a GPU machine, else on the CPU
    max_queue_size: int = 256  # requests waiting in Triton's queue; beyond it Triton refuses at once
    startup_timeout_s: float = 600.0
    log_file: str | None = None  # Triton's log; None: kept in memory (its tail explains a failed start)

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host:
            raise HybridStitchError("--host must be an address to bind, e.g. 127.0.0.1 (loopback) or 0.0.0.0 (all interfaces)")
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= PORT_MAX:
                raise HybridStitchError(f"--{name.replace('_', '-')} must be a port from 0 (any free one) to {PORT_MAX}, got {port!r}")
        given = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if p]
        if len(set(given)) != len(given):
            raise HybridStitchError(f"the HTTP, gRPC and metrics ports must differ, got {self.http_port}, {self.grpc_port}, "
                                    f"{self.metrics_port}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise HybridStitchError(f"--max-batch-size must be a positive integer, got {self.max_batch_size!r}")
        if not isinstance(self.max_queue_delay_ms, (int, float)) or not math.isfinite(self.max_queue_delay_ms) \
                or self.max_queue_delay_ms < 0:
            raise HybridStitchError(f"--max-queue-delay-ms must be a finite number >= 0, got {self.max_queue_delay_ms!r}")
        if not isinstance(self.instances, int) or self.instances < 1:
            raise HybridStitchError(f"--instances must be a positive integer, got {self.instances!r}")
        if not isinstance(self.max_queue_size, int) or self.max_queue_size < 1:
            raise HybridStitchError(f"--max-queue-size must be a positive integer, got {self.max_queue_size!r}")
        if not self.startup_timeout_s > 0:
            raise HybridStitchError(f"the start-up timeout must be positive, got {self.startup_timeout_s!r}")
