"""The pipeline one model instance serves, loaded from its :class:`ModelSettings`."""

from __future__ import annotations

from ..conditioning import no_conditioner_error
from .repository import engine_backend
from .runner import GenerationRequest, generate_one
from .settings import ModelSettings


def load_pipeline(settings: ModelSettings, device: str = "cpu"):
    """Engines (ONNX Runtime or TensorRT, as their manifest says) or the torch pair, on ``device``
    ("cpu" or "cuda:N"), warmed up with one short request of the server's default method."""
    import torch

    from ..pipeline import HybridStitchPipeline

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if settings.engines is not None:
        if engine_backend(settings.engines) == "tensorrt":
            torch.cuda.set_device(torch.device(device))  # TensorRT engines load on the current device
            pipe = HybridStitchPipeline.from_engines(settings.engines, backend="tensorrt")
        else:
            pipe = HybridStitchPipeline.from_engines(settings.engines, backend="onnxruntime", num_threads=settings.threads)
    else:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe = HybridStitchPipeline.from_pretrained(large=settings.large, small=settings.small, torch_dtype=dtype, device=device)
    if pipe.conditioner is None:  # the server takes prompts, so it needs the text encoders and VAE
        raise no_conditioner_error()
    # Warm-up: session and allocator set-up is paid here, not by the first request, and a default
    # the engines cannot serve (a missing bucket) fails the start instead of every request.
    generate_one(pipe, GenerationRequest(prompt="", seed=0, steps=2, guidance_scale=settings.guidance_scale,
                                         method=settings.method))
    return pipe
