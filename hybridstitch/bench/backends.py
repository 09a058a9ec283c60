"""How a benchmark workload gets its large/small denoisers on each backend.

``eager``: diffusers modules (the PyTorch baseline); ``compile``: the same modules under
``torch.compile``; ``onnxruntime`` and ``tensorrt``: engines exported through
:mod:`hybridstitch.export` and loaded with :meth:`HybridStitchPipeline.from_engines`, the path a
user takes. A backend that cannot run here raises :class:`BackendUnavailable` with the reason
the report shows (for TensorRT on a machine without it: the export's own refusal).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

from hybridstitch.config import PRESETS, StitchConfig
from hybridstitch.errors import HybridStitchError
from hybridstitch.latency_model import ratio_key

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")
ENGINE_BACKENDS = ("onnxruntime", "tensorrt")
TENSORRT_PRECISIONS = ("fp16", "fp32")
DEFAULT_ENGINE_CACHE = os.path.join(tempfile.gettempdir(), "hybridstitch-bench-engines")

Runner = Callable[[StitchConfig, bool], Any]  # (config, warmup) -> Trace with total_seconds = end to end


class BackendUnavailable(Exception):
    """A backend (or workload) that cannot run here; the message is the reason shown in the report."""


@dataclass(frozen=True)
class WorkloadSettings:
    """What every workload of a latency benchmark shares."""

    methods: tuple[str, ...]
    seed: int = 0
    guidance_scale: float = 4.0  # > 1: CFG, batch 2
    threads: int = 1  # torch and ONNX Runtime threads
    engine_cache: str = DEFAULT_ENGINE_CACHE  # exported engines (and saved synthetic models) between runs
    tensorrt_precision: str = "fp16"  # TensorRT engines; ONNX Runtime engines stay fp32 like the eager baseline

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in PRESETS and not is_cached(m)]
        if unknown:
            raise HybridStitchError(f"unknown method(s) {', '.join(unknown)}; choose preset names from {', '.join(PRESETS)}, "
                                    "or cached methods (hybridstitch.cachehooks: taylorseer, pab, fastercache, "
                                    "<preset>+taylorseer)")
        if not self.methods:
            raise HybridStitchError("no methods to measure; pass --methods with at least one preset (e.g. large)")
        if self.threads < 1:
            raise HybridStitchError(f"--threads must be >= 1, got {self.threads}")
        if self.tensorrt_precision not in TENSORRT_PRECISIONS:
            raise HybridStitchError(
                f"--tensorrt-precision must be one of {', '.join(TENSORRT_PRECISIONS)}, got {self.tensorrt_precision!r}")

    @property
    def cfg_batch(self) -> int:
        return 2 if self.guidance_scale > 1 else 1



def is_cached(name: str) -> bool:
    """``name`` is a method with diffusers' cache hooks (:mod:`hybridstitch.cachehooks`), not a preset."""
    from hybridstitch import cachehooks

    return name not in PRESETS and cachehooks.is_method(name)


def method_config(name: str) -> StitchConfig:
    """A method's config: its preset, or a cached method's preset under the method's own name."""
    if name in PRESETS:
        return StitchConfig.preset(name)
    from hybridstitch import cachehooks

    return StitchConfig.preset(cachehooks.method(name).preset).replace(name=name)


def engine_buckets(methods) -> list[float]:
    """The mask-ratio buckets ``methods`` use (engines are exported for these; 0.3 when none do)."""
    return sorted({ratio_key(r) for m in methods if not is_cached(m) for r in StitchConfig.preset(m).mask_ratios}) or [0.3]


def check_compile() -> None:
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++")):
        raise BackendUnavailable("torch.compile's CPU backend needs a C++ compiler; none on PATH")


def compiled_denoiser(model, name: str):
    """A :class:`TorchDenoiser` whose full forward (``model.compile()``, in place) and masked
    forward (``torch.compile`` of the same function) run compiled graphs."""
    import torch

    from hybridstitch.engine.torch_backend import TorchDenoiser, cache_from, caches_of, masked_transformer_forward

    class CompiledTorchDenoiser(TorchDenoiser):
        backend = "torch-compile"

        def __init__(self, model, name):
            super().__init__(model, name)
            self.model.compile()
            self._masked = torch.compile(masked_transformer_forward)

        @torch.no_grad()
        def forward_masked(self, latents, prompt_embeds, pooled, timestep, index, caches):
            cache = cache_from(caches, self.spec)
            dt = self.dtype
            tokens = self._masked(self.model, latents.to(dt), prompt_embeds.to(dt), pooled.to(dt), timestep, index, cache)
            return tokens, caches_of(cache, self.spec)

    return CompiledTorchDenoiser(model, name)


def engine_pipeline(backend: str, large_dir: str, small_dir: str, engine_dir: str, settings: WorkloadSettings, *,
                    methods, height: int, width: int, text_tokens: int | None, vae_scale_factor: int | None = None):
    """Export (or reuse) ``backend`` engines of a pair into ``engine_dir`` for the buckets of
    ``methods`` and load them as a pipeline.

    The folder is the benchmark's own cache: engines of another configuration in it are rebuilt
    (``overwrite``), matching ones reused. A refusal of the export or of the loader (TensorRT
    not installed, no GPU, ...) becomes :class:`BackendUnavailable` with its message.
    """
    if backend not in ENGINE_BACKENDS:
        raise BackendUnavailable(f"{backend} is not an engine backend ({', '.join(ENGINE_BACKENDS)})")
    try:
        from hybridstitch.export import ExportRequest, export_engines
    except ImportError as e:  # an install without the export's dependencies (onnx, onnxscript)
        raise BackendUnavailable(f"the engine export is not available: {e}") from None
    from hybridstitch.pipeline import HybridStitchPipeline

    precision = settings.tensorrt_precision if backend == "tensorrt" else "fp32"
    try:
        req = ExportRequest(large=large_dir, small=small_dir, height=height, width=width, batch=settings.cfg_batch,
                            buckets=tuple(engine_buckets(methods)), precision=precision, backend=backend,
                            text_tokens=text_tokens, vae_scale_factor=vae_scale_factor, overwrite=True)
        export_engines(req, engine_dir, progress=False)
        if backend == "tensorrt":
            return HybridStitchPipeline.from_engines(engine_dir, backend="tensorrt")
        return HybridStitchPipeline.from_engines(engine_dir, backend="onnxruntime", num_threads=settings.threads)
    except HybridStitchError as e:
        raise BackendUnavailable(str(e)) from None


def engine_folder(settings: WorkloadSettings, stem: str, backend: str) -> str:
    """The cache folder of one workload's engines on one backend (TensorRT per precision)."""
    suffix = "" if backend == "onnxruntime" else f"-tensorrt-{settings.tensorrt_precision}"
    return os.path.join(settings.engine_cache, stem + suffix)
