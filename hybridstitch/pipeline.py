"""The pipeline users call: ``HybridStitchPipeline.from_pretrained(large=..., small=...)(prompt=...)``.

``__call__`` reads top to bottom as numbered steps, like diffusers' SD3 pipeline; the
denoising loop asks the :class:`~hybridstitch.policy.StagePolicy` what to run and calls the
models through the :class:`~hybridstitch.denoiser.Denoiser` interface only, so any backend
(torch, ONNX Runtime, TensorRT) drives the same method.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checks
from .conditioning import Conditioning, EncoderOptions, no_conditioner_error
from .config import StitchConfig
from .denoiser import Denoiser, MaskedDenoiser, TransformerSpec, check_pair
from .errors import HybridStitchError
from .latency_model import warn_if_bound_violated
from .policy import Stage
from .sample import Sample, Timesteps, draw_noise, new_sample
from .step import step
from .trace import Trace

DEFAULT_PRESET = "hybridstitch-30"


@dataclass
class PreparedCall:
    """A call checked, encoded and split into samples (steps 1-3), waiting for its denoising loop."""

    samples: list[Sample]
    config: StitchConfig
    output_type: str
    progress: bool
    t_start: float


@dataclass
class HybridStitchOutput:
    images: Any  # list of PIL images, or the latents [B, C, h, w] with output_type="latent"
    traces: list[Trace]  # one per image: its own stages, switch steps, masks and call times

    @property
    def trace(self) -> Trace:
        """The trace of a one-image call (several images: ``traces``, one each)."""
        if len(self.traces) != 1:
            raise HybridStitchError(
                f"this call made {len(self.traces)} images, each with its own stages and trace: use .traces[i]"
            )
        return self.traces[0]


class HybridStitchPipeline:
    """HybridStitch over a large and a small SD3-family transformer."""

    def __init__(
        self,
        large: MaskedDenoiser,
        small: Denoiser,
        scheduler,
        conditioner=None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        default_sample_size: int | None = None,
        vae_scale_factor: int | None = None,
        encoders: str = "device",
        concurrent_stage2: bool = False,
    ):
        check_pair(large.spec, small.spec)
        self.large = large
        self.small = small
        self.scheduler = scheduler
        self.conditioner = conditioner
        self.device = torch.device(device)
        self.dtype = dtype
        if vae_scale_factor is None:
            # Transformer-only folders: SD3's VAE downsamples by 8.
            vae_scale_factor = conditioner.vae_scale_factor if conditioner is not None else 8
        self.vae_scale_factor = vae_scale_factor
        self.default_sample_size = default_sample_size
        self.backend = getattr(large, "backend", "torch")
        self.encoders = EncoderOptions(encoders).placement  # "none": prompts are refused, prompt_embeds required
        # Stage 2's small call in a second thread, beside the masked large call (see :meth:`advance`).
        self.stage2_pool = ThreadPoolExecutor(1, thread_name_prefix="hybridstitch-small") if concurrent_stage2 else None

    def advance(self, samples) -> int:
        """One step of every sample not yet done (:func:`hybridstitch.step.step`); returns the engine calls.
        With ``concurrent_stage2`` the small call runs in a second thread while this one runs the large
        calls: it pays when the engines leave the device (CPU cores, GPU streams) partly idle."""
        return step([s for s in samples if not s.done], self.large, self.small, dtype=self.dtype, device=self.device,
                    pool=self.stage2_pool)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        large: str,
        small: str,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        *,
        large_config: str | None = None,
        small_config: str | None = None,
        conditioner_folder: str | None = None,
        encoders: str = "device",
        text_encoder_3: Any = "load",
    ) -> "HybridStitchPipeline":
        """Load the large and small transformers from local disk, each from a diffusers pipeline or
        transformer folder, a Hugging Face cache entry (repo folder, snapshot folder, or a cached
        repo id) or a single ``.safetensors`` file (SAI's or diffusers' keys, fp8 upcast to the dtype).

        A single file carries no config: ``large_config`` / ``small_config`` name a local folder (or
        config.json) of the same model, else a ``config.json`` beside the file is read; nothing is
        fetched from the Hub. ``torch_dtype`` None: bfloat16 for a large model with qk-norm (SD3.5)
        on a CUDA device with bf16, float32 otherwise (:func:`~hybridstitch.loading.default_torch_dtype`).

        Text encoders and VAE come from ``conditioner_folder``, else from the large checkpoint's
        pipeline folder (a single file's config folder when that is a pipeline folder); without
        them pass ``prompt_embeds`` and ``output_type="latent"``. ``encoders``: ``"device"`` (with
        the transformers), ``"cpu"`` (text encoders on the CPU) or ``"none"`` (not loaded; pass
        ``prompt_embeds``). ``text_encoder_3``: ``"load"``, ``"none"`` (drop T5; its tokens are
        zero-padded, as diffusers does) or a loaded T5 encoder module (e.g. 8-bit).
        """
        from hybridstitch.engine.torch_backend import TorchDenoiser

        from .checkpoints import resolve_checkpoint
        from .loading import (check_dtype, conditioner_folder_of, default_torch_dtype, load_placed_conditioner,
                              load_scheduler, load_transformer, parse_device, spec_of)

        # Everything that can be refused without loading a weight is checked first.
        device = parse_device(device)
        options = EncoderOptions(encoders, text_encoder_3)
        torch_dtype = check_dtype(torch_dtype)
        large_ckpt = resolve_checkpoint(large, "large", large_config)
        small_ckpt = resolve_checkpoint(small, "small", small_config)
        check_pair(spec_of(large_ckpt), spec_of(small_ckpt))
        folder = conditioner_folder_of(conditioner_folder, large_ckpt.pipeline_folder)
        dtype = torch_dtype or default_torch_dtype(device, large_ckpt.config())

        large_model = load_transformer(large_ckpt, "large", dtype).to(device)
        small_model = load_transformer(small_ckpt, "small", dtype).to(device)
        check_pair(TransformerSpec.from_config(large_model.config), TransformerSpec.from_config(small_model.config))
        # None: each conditioner loader's own default (float32 for SD3 folders), as when the user passes none.
        cond_dtype = torch_dtype or (None if dtype == torch.float32 else dtype)
        conditioner = load_placed_conditioner(folder, cond_dtype, options, large_model.config.joint_attention_dim, device)
        return cls(
            TorchDenoiser(large_model, "large"),
            TorchDenoiser(small_model, "small"),
            load_scheduler(large_ckpt.pipeline_folder or folder),
            conditioner,
            device=device,
            dtype=dtype,
            default_sample_size=large_model.config.sample_size,
            encoders=options.placement,
        )

    @classmethod
    def from_engines(
        cls,
        engine_dir: str,
        providers=None,
        num_threads: int | None = None,
        conditioner_folder: str | None = None,
        backend: str | None = None,
        check_weights: bool = True,
        verify_files: bool = True,
        torch_dtype: torch.dtype | None = None,
        *,
        encoders: str = "device",
        text_encoder_3: Any = "load",
        concurrent_stage2: bool = False,
    ) -> "HybridStitchPipeline":
        """Run the method on exported engines (``hybridstitch-export --out engine_dir``).

        The engines, their manifest and (when still on disk) the source weights are checked before
        anything runs; requests are then checked against the manifest's resolution, batch and
        buckets. The text encoders / VAE come from ``conditioner_folder``, else from the large
        checkpoint folder recorded in the manifest (none: pass ``prompt_embeds`` and
        ``output_type="latent"``); ``encoders`` and ``text_encoder_3`` place or drop them as in
        :meth:`from_pretrained`. ``backend`` (``"onnxruntime"`` or ``"tensorrt"``) defaults to the
        manifest's (to onnxruntime when ``providers`` or ``num_threads`` is given); ``providers`` (CPU
        by default; ``"cuda"``, ``"tensorrt"`` with onnxruntime-gpu) and ``num_threads`` go to ONNX
        Runtime. TensorRT engines load the folder's build for this GPU
        (:func:`hybridstitch.engine.tensorrt_backend.load_engines`). ``concurrent_stage2``: see :meth:`advance`.
        """
        from .loading import check_dtype, conditioner_folder_of, load_placed_conditioner

        if backend not in (None, "onnxruntime", "tensorrt"):
            raise HybridStitchError(f"unknown backend {backend!r}; choose onnxruntime or tensorrt (or None: the manifest's)")
        if num_threads is not None:
            num_threads = checks.integer("num_threads", num_threads, minimum=1)
        options = EncoderOptions(encoders, text_encoder_3)
        torch_dtype = check_dtype(torch_dtype)
        conditioner_folder = conditioner_folder_of(conditioner_folder, None)
        if backend is None and providers is None and num_threads is None:  # else: ONNX Runtime settings were given
            from hybridstitch.engine.manifest import read_manifest

            backend = read_manifest(engine_dir).backend.get("name", "onnxruntime")
        if backend == "tensorrt":
            if providers is not None or num_threads is not None:
                raise HybridStitchError("providers and num_threads are ONNX Runtime settings; TensorRT engines take neither")
            from hybridstitch.engine.tensorrt_backend import load_engines as load_tensorrt_engines

            engines = load_tensorrt_engines(engine_dir, check_weights=check_weights, verify_files=verify_files)
        else:
            from hybridstitch.engine.onnxruntime_backend import load_engines

            engines = load_engines(engine_dir, providers=providers, num_threads=num_threads,
                                   check_weights=check_weights, verify_files=verify_files)
        manifest = engines.manifest
        vae_scale = int(manifest.resolution["vae_scale_factor"])
        recorded = manifest.models["large"]["path"]
        folder = conditioner_folder or (recorded if os.path.isdir(recorded) else None)
        conditioner = load_placed_conditioner(folder, torch_dtype, options, engines.large.spec.joint_attention_dim,
                                              engines.device)
        if conditioner is not None and conditioner.vae_scale_factor != vae_scale:
            raise HybridStitchError(
                f"the conditioner in {folder} has VAE scale factor {conditioner.vae_scale_factor}, the engines were "
                f"exported for {vae_scale}; use the conditioner of the exported checkpoints"
            )
        return cls(
            engines.large,
            engines.small,
            engines.scheduler(),
            conditioner,
            device=engines.device,
            dtype=torch_dtype or torch.float32,
            default_sample_size=int(manifest.resolution["latent_height"]),
            vae_scale_factor=vae_scale,
            encoders=options.placement,
            concurrent_stage2=concurrent_stage2,
        )

    # -- checks ------------------------------------------------------------------------------

    def _check_size(self, height, width) -> tuple[int, int]:
        """Pixels -> latent size [h, w]; None means the model's default size."""
        default = (self.default_sample_size or 128) * self.vae_scale_factor
        height = default if height is None else checks.integer("height", height, minimum=1)
        width = default if width is None else checks.integer("width", width, minimum=1)
        p = self.large.spec.patch_size
        mult = self.vae_scale_factor * p
        if height % mult or width % mult:
            raise HybridStitchError(
                f"height and width must be positive multiples of {mult} (VAE scale {self.vae_scale_factor} x patch {p}); "
                f"got {height}x{width}. Try {max(mult, height // mult * mult)}x{max(mult, width // mult * mult)}"
            )
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        for den in (self.large, self.small):
            limit = den.spec.pos_embed_max_size
            if limit is not None and (h // p > limit or w // p > limit):
                most = limit * p * self.vae_scale_factor
                raise HybridStitchError(
                    f"{height}x{width} is beyond the {den.name} transformer's positional embedding "
                    f"(pos_embed_max_size {limit} patches per side): use height and width of at most {most}"
                )
        return h, w

    def _text_request(
        self, prompt, negative_prompt, prompt_embeds, pooled_prompt_embeds,
        negative_prompt_embeds, negative_pooled_prompt_embeds, do_cfg, num_images_per_prompt,
    ) -> tuple[tuple, int]:
        """Check the text inputs without encoding anything: ``(("text", prompts, negs) | ("embeds", pe, ppe, npe,
        nppe), batch)`` with ``batch`` = images in the request."""
        if (prompt is None) == (prompt_embeds is None):
            raise HybridStitchError("pass exactly one of `prompt` or `prompt_embeds` (with `pooled_prompt_embeds`)")
        if prompt is not None:
            prompts = checks.prompts("prompt", prompt)
            if negative_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
                raise HybridStitchError("negative_prompt_embeds go with prompt_embeds; with `prompt` pass `negative_prompt` text")
            if self.encoders == "none":
                raise HybridStitchError(
                    "this pipeline was loaded with encoders='none' (no text encoders): pass prompt_embeds and "
                    "pooled_prompt_embeds (and the negative ones when guidance_scale > 1), or load it with "
                    "encoders='device' or 'cpu'"
                )
            if self.conditioner is None:
                raise no_conditioner_error()
            negs = [""] * len(prompts) if negative_prompt is None else checks.prompts("negative_prompt", negative_prompt)
            if len(negs) == 1 and len(prompts) > 1:
                negs = negs * len(prompts)
            if len(negs) != len(prompts):
                raise HybridStitchError(
                    f"got {len(prompts)} prompts but {len(negs)} negative prompts; pass one negative prompt or one per prompt"
                )
            return ("text", prompts, negs), len(prompts) * num_images_per_prompt

        if negative_prompt is not None:
            raise HybridStitchError("negative_prompt is text and goes with `prompt`; with prompt_embeds pass negative_prompt_embeds")
        if pooled_prompt_embeds is None:
            raise HybridStitchError("`prompt_embeds` needs `pooled_prompt_embeds` too (as in diffusers' SD3 pipeline)")
        spec = self.large.spec
        pe = checks.tensor("prompt_embeds", prompt_embeds, ndim=3)
        ppe = checks.tensor("pooled_prompt_embeds", pooled_prompt_embeds, ndim=2)
        if pe.shape[0] < 1 or pe.shape[1] < 1 or pe.shape[-1] != spec.joint_attention_dim:
            raise HybridStitchError(
                f"prompt_embeds must be [batch >= 1, tokens >= 1, {spec.joint_attention_dim}], got {list(pe.shape)}"
            )
        if ppe.shape != (pe.shape[0], spec.pooled_projection_dim):
            raise HybridStitchError(
                f"pooled_prompt_embeds must be [{pe.shape[0]}, {spec.pooled_projection_dim}], got {list(ppe.shape)}"
            )
        npe = nppe = None
        if do_cfg:
            if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
                raise HybridStitchError(
                    "guidance_scale > 1 with prompt_embeds needs negative_prompt_embeds and negative_pooled_prompt_embeds "
                    "(or set guidance_scale=1.0 to turn guidance off)"
                )
            npe = checks.tensor("negative_prompt_embeds", negative_prompt_embeds, ndim=3)
            nppe = checks.tensor("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, ndim=2)
            if npe.shape != pe.shape or nppe.shape != ppe.shape:
                raise HybridStitchError("negative_prompt_embeds / negative_pooled_prompt_embeds must match the positive ones' shapes")
        return ("embeds", pe, ppe, npe, nppe), pe.shape[0] * num_images_per_prompt

    def _conditioning(self, request: tuple, do_cfg: bool, num_images_per_prompt: int) -> Conditioning:
        """The checked text request (:meth:`_text_request`) as CFG-batched conditioning on the
        transformers' device and dtype."""
        n = num_images_per_prompt
        if request[0] == "text":
            _, prompts, negs = request
            prompts = [p for p in prompts for _ in range(n)]
            negs = [q for q in negs for _ in range(n)]
            cond = self.conditioner.encode(prompts, negs, do_cfg, self.device)
            pe, ppe = cond.prompt_embeds, cond.pooled
            if not (torch.isfinite(pe).all() and torch.isfinite(ppe).all()):
                raise HybridStitchError(
                    "the text encoders returned NaN or infinite embeddings (T5 overflows in float16): load the pipeline "
                    "with torch_dtype=torch.bfloat16 or torch.float32"
                )
        else:
            _, pe, ppe, npe, nppe = request
            if n > 1:
                pe, ppe = pe.repeat_interleave(n, 0), ppe.repeat_interleave(n, 0)
            if do_cfg:
                if n > 1:
                    npe, nppe = npe.repeat_interleave(n, 0), nppe.repeat_interleave(n, 0)
                pe, ppe = torch.cat([npe.to(pe.device), pe]), torch.cat([nppe.to(ppe.device), ppe])
        # Text encoders may run elsewhere (encoders="cpu"): the embeddings go to the transformers.
        return Conditioning(pe.to(self.device, self.dtype), ppe.to(self.device, self.dtype))

    # -- the call -----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, *args, **kwargs) -> HybridStitchOutput:
        """Generate images (arguments: :meth:`prepare`'s, diffusers' SD3 pipeline's names). Every image
        takes its own stages, in engine calls shared with the others (see :mod:`hybridstitch.step`)."""
        call = self.prepare(*args, **kwargs)  # 1-3: check, encode, prepare latents and samples
        samples = call.samples
        for _ in tqdm(range(max(len(s.schedule.timesteps) for s in samples)), disable=not call.progress,
                      desc=call.config.name, leave=False):  # 4-5: the denoising loop
            self.advance(samples)
        return self.finish(call, _stacklevel=6)  # 6: decode

    @torch.no_grad()
    def prepare(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        config: StitchConfig | str | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        progress: bool = True,
        record_masks: bool = False,
    ) -> PreparedCall:
        """Steps 1-3 of a call: check every argument, encode the prompts, draw the noise, and make one
        :class:`~hybridstitch.sample.Sample` per image. Bad input raises here, before any model work."""
        t_start = time.perf_counter()
        # 1. Check inputs: every argument, before any work (no text encoded, no noise drawn)
        if config is None:
            config = StitchConfig.preset(DEFAULT_PRESET)
        elif isinstance(config, str):
            config = StitchConfig.preset(config)
        elif not isinstance(config, StitchConfig):
            raise HybridStitchError(f"config must be a StitchConfig or a preset name, got {type(config).__name__}")
        # More steps than the scheduler's training timesteps only repeats them (and 10**20 exhausts memory).
        most = int(getattr(self.scheduler.config, "num_train_timesteps", 1000))
        num_inference_steps = checks.integer("num_inference_steps", num_inference_steps, minimum=1, maximum=most)
        guidance_scale = checks.real("guidance_scale", guidance_scale)
        num_images_per_prompt = checks.integer("num_images_per_prompt", num_images_per_prompt, minimum=1)
        progress, record_masks = checks.flag("progress", progress), checks.flag("record_masks", record_masks)
        if not isinstance(output_type, str) or output_type not in ("pil", "latent"):
            raise HybridStitchError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        if output_type == "pil" and self.conditioner is None:
            raise no_conditioner_error()
        h, w = self._check_size(height, width)
        height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
        do_cfg = guidance_scale > 1.0
        request, batch = self._text_request(
            prompt, negative_prompt, prompt_embeds, pooled_prompt_embeds,
            negative_prompt_embeds, negative_pooled_prompt_embeds, do_cfg, num_images_per_prompt,
        )
        generator = checks.generators(generator, batch)
        shape = (batch, self.large.spec.in_channels, h, w)  # [B, C, h, w]
        if latents is not None:
            latents = checks.tensor("latents", latents, ndim=4)
            if tuple(latents.shape) != shape:
                raise HybridStitchError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")

        # 2. Encode the prompt (shared by both models)
        cond = self._conditioning(request, do_cfg, num_images_per_prompt)

        # 3. Prepare latents: [B, C, h, w], and one sample per image
        latents = (draw_noise(shape, generator) if latents is None else latents).to(self.device, self.dtype)
        samples = self.samples(latents, cond, config, num_inference_steps, guidance_scale, record_masks=record_masks)
        for s in samples:
            s.trace.height, s.trace.width = height, width
        return PreparedCall(samples, config, output_type, progress, t_start)

    def samples(self, latents: torch.Tensor, cond: Conditioning, config: StitchConfig, num_inference_steps: int,
                guidance_scale: float, schedule: list[Stage] | None = None, record_masks: bool = False,
                first_id: int = 0) -> list[Sample]:
        """One :class:`~hybridstitch.sample.Sample` per image of ``latents`` [B, C, h, w] with its rows of
        ``cond`` (CFG-batched [uncond..., cond...] when guidance is on), checked against the backends."""
        batch, _, h, w = latents.shape
        guided = guidance_scale > 1.0
        # Backends with fixed shapes (engines) refuse a request they cannot serve before any work.
        self.large.validate_request(batch * (2 if guided else 1), h, w,
                                    config.mask_ratios if config.uses_masked_large else ())
        self.small.validate_request(batch * (2 if guided else 1), h, w)
        timesteps = Timesteps.of(self.scheduler, num_inference_steps, latents.device)
        samples = []
        for i in range(batch):
            rows = [i, batch + i] if guided else [i]  # [unconditional, conditional] side by side
            trace = Trace(config=config.to_dict(), num_steps=num_inference_steps, height=h, width=w, batch=batch,
                          backend=self.backend, sample=i)
            samples.append(new_sample(first_id + i, latents[i:i + 1], cond.prompt_embeds[rows], cond.pooled[rows],
                                      guidance_scale, config, timesteps, self.large.spec.patch_size, trace,
                                      replay=schedule, record_masks=record_masks))
        return samples

    def finish(self, call: "PreparedCall", _stacklevel: int = 4) -> HybridStitchOutput:
        """Step 6 of a call whose samples are done: decode, close the traces. A failed sample fails the call."""
        samples = call.samples
        for s in samples:
            if s.error is not None:
                raise s.error
        traces = [s.trace for s in samples]
        # The mask-ratio bound t_l(r) + t_s < t_l on this run's own call times: warn once per config.
        # (stacklevel: warn_if_bound_violated, finish, __call__, torch.no_grad's wrapper, the caller)
        warn_if_bound_violated(call.config, traces[0], self.__dict__.setdefault("_latency_bound_warned", set()),
                               stacklevel=_stacklevel - 1)
        latents = torch.cat([s.latents for s in samples])
        images = latents if call.output_type == "latent" else self.conditioner.decode(latents)
        for trace in traces:
            trace.total_seconds = time.perf_counter() - call.t_start
        return HybridStitchOutput(images=images, traces=traces)

    def denoise(
        self,
        latents: torch.Tensor,
        cond: Conditioning,
        config: StitchConfig,
        num_inference_steps: int,
        guidance_scale: float,
        schedule: list[Stage] | None = None,
        progress: bool = False,
        record_masks: bool = False,
    ) -> tuple[torch.Tensor, list[Trace]]:
        """The denoising loop alone (steps 4-5 of ``__call__``), for callers that bring their own
        latents [B, C, h, w] and CFG-batched conditioning ([uncond..., cond...] when guidance is on).

        Every image is a :class:`~hybridstitch.sample.Sample` with its own stages, masks and KV cache;
        each step groups the engine calls (:func:`hybridstitch.step.step`). ``schedule`` replays a
        fixed stage per step instead of the stage policy (latency benchmarks with given switch
        steps); differences and masks are computed as usual. Returns the final latents and one
        trace per image (``total_seconds`` = this call).
        """
        t_start = time.perf_counter()
        if schedule is not None and len(schedule) != num_inference_steps:
            raise HybridStitchError(f"schedule has {len(schedule)} stages for {num_inference_steps} steps; give one per step")
        samples = self.samples(latents, cond, config, num_inference_steps, guidance_scale, schedule=schedule,
                               record_masks=record_masks)
        for _ in tqdm(range(num_inference_steps), disable=not progress, desc=config.name, leave=False):
            self.advance(samples)
        for s in samples:
            if s.error is not None:
                raise s.error
        for trace in (s.trace for s in samples):
            trace.total_seconds = time.perf_counter() - t_start
        return torch.cat([s.latents for s in samples]), [s.trace for s in samples]
