"""The testbed workload: the shipped trained pair through the real pipeline.

The switching decisions are the method's own (from ``d_i``), so this workload measures what a
user of the testbed would see, prompt encoding included.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from hybridstitch.config import PRESETS, StitchConfig
from hybridstitch.errors import HybridStitchError

from .backends import (BackendUnavailable, Runner, WorkloadSettings, check_compile, compiled_denoiser, engine_folder,
                       engine_pipeline, is_cached)


@dataclass(frozen=True)
class TestbedSettings:
    """The testbed workload's folders and request (``None``: the shipped pair, the model's size)."""

    __test__ = False  # not a pytest class
    large: str | None = None
    small: str | None = None
    steps: int = 28
    size: int | None = None  # height = width in pixels
    text_tokens: int = 8  # random text embeddings when the folders have no prompt encoder
    prompt: str = "a handwritten 3"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise HybridStitchError(f"--testbed-steps must be >= 1, got {self.steps}")
        if self.text_tokens < 1:
            raise HybridStitchError(f"--testbed-text-tokens must be >= 1, got {self.text_tokens}")


def testbed_preset(name: str) -> str:
    """A calibrated ``testbed-*`` preset stands in for ``hybridstitch-*`` on the testbed when it exists
    (``hybridstitch-10+taylorseer`` -> ``testbed-10+taylorseer`` too)."""
    base, plus, hook = name.partition("+")
    if base.startswith("hybridstitch-"):
        alt = "testbed-" + base[len("hybridstitch-"):]
        if alt in PRESETS:
            return alt + plus + hook
    return name


def _shape_text(spec) -> str:
    return f"{spec.num_layers} layers x {spec.num_heads} heads x {spec.head_dim} (qk_norm {spec.qk_norm})"


class TestbedWorkload:
    """The trained pair through the real pipeline: stage decisions come from ``d_i``."""

    __test__ = False
    name = "testbed"

    def __init__(self, settings: TestbedSettings, common: WorkloadSettings):
        from hybridstitch import testbed

        self.settings, self.common = settings, common
        self.large_dir = settings.large or testbed.LARGE_DIR
        self.small_dir = settings.small or testbed.SMALL_DIR
        for d in (self.large_dir, self.small_dir):
            if not os.path.isdir(d):
                raise BackendUnavailable(
                    f"testbed weights not found at {d}; train them with `python -m hybridstitch.testbed.train` "
                    "or pass --testbed-large/--testbed-small"
                )
        # The calibrated testbed-* presets fit the shipped pair only; other folders keep the names given.
        shipped = not (settings.large or settings.small)
        self.methods = [testbed_preset(m) if shipped else m for m in common.methods]
        self._eager = self._load()
        p = self._eager
        size = settings.size or (p.default_sample_size or 128) * p.vae_scale_factor
        self.height = self.width = size
        spec = p.large.spec
        self.text_inputs = None
        if p.conditioner is None:  # transformer-only folders: random text embeddings of the pair's widths
            import torch

            g = torch.Generator().manual_seed(common.seed)
            t = settings.text_tokens
            self.text_inputs = dict(
                prompt_embeds=torch.randn(1, t, spec.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(1, spec.pooled_projection_dim, generator=g),
                negative_prompt_embeds=torch.randn(1, t, spec.joint_attention_dim, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, spec.pooled_projection_dim, generator=g),
            )
        self.description = {
            "what": "shipped trained testbed pair through the real pipeline (switching decided from d_i)",
            "large": self.large_dir,
            "small": self.small_dir,
            "large_shape": _shape_text(spec),
            "small_shape": _shape_text(p.small.spec),
            "height": size,
            "width": size,
            "image_tokens": (size // p.vae_scale_factor // spec.patch_size) ** 2,
            "steps": settings.steps,
            "guidance_scale": common.guidance_scale,
            "prompt": None if self.text_inputs else settings.prompt,
            "cfg_batch": common.cfg_batch,
        }

    def _load(self):
        from hybridstitch.pipeline import HybridStitchPipeline

        return HybridStitchPipeline.from_pretrained(large=self.large_dir, small=self.small_dir)

    def runner(self, backend: str) -> Runner:
        if backend == "eager":
            pipe = self._eager
        elif backend == "compile":
            check_compile()
            pipe = self._load()
            pipe.large = compiled_denoiser(pipe.large.model, "large")
            pipe.small = compiled_denoiser(pipe.small.model, "small")
        elif backend in ("onnxruntime", "tensorrt"):
            stem = f"testbed-{self.height}px-b{self.common.cfg_batch}"
            pipe = engine_pipeline(
                backend, self.large_dir, self.small_dir, engine_folder(self.common, stem, backend), self.common,
                methods=self.methods, height=self.height, width=self.width, text_tokens=self.settings.text_tokens if self.text_inputs else None,
            )
        else:
            raise BackendUnavailable(f"unknown backend {backend!r}")
        hooked: dict = {}  # cached methods (eager only): the pipeline with diffusers' hooks, made once

        def pipe_for(config):
            if not is_cached(config.name):
                return pipe
            if config.name not in hooked:
                from hybridstitch.cachehooks import hooked_pipeline

                hooked[config.name] = hooked_pipeline(pipe, config.name)
            return hooked[config.name]

        return lambda config, warmup: self._run(pipe_for(config), config)

    @staticmethod
    def supports(backend: str, name: str) -> bool:
        """Cached methods hook diffusers modules: the eager backend only."""
        return backend == "eager" or not is_cached(name)

    def _run(self, pipe, config: StitchConfig):
        import torch

        s = self.settings
        kwargs = dict(config=config, num_inference_steps=s.steps, guidance_scale=self.common.guidance_scale,
                      height=self.height, width=self.width, generator=torch.Generator().manual_seed(self.common.seed),
                      output_type="latent", progress=False)
        if self.text_inputs is not None:
            kwargs.update(self.text_inputs)
        else:
            kwargs["prompt"] = s.prompt
        t0 = time.perf_counter()
        out = pipe(**kwargs)
        trace = out.traces[0]  # one image
        trace.total_seconds = time.perf_counter() - t0  # the caller's view, prompt encoding included
        return trace
