"""The caching methods users already have: diffusers' cache hooks on the pair's transformers.

diffusers (0.42) ships TaylorSeer, Pyramid Attention Broadcast (PAB), FasterCache and
FirstBlockCache as hooks. ``SD3Transformer2DModel`` lacks diffusers' ``CacheMixin``, so they are
attached here by hand, with diffusers' own ``apply_*`` functions, to a copy of a
:class:`~hybridstitch.engine.torch_backend.TorchDenoiser`'s transformer that shares its weights,
and the copy is put behind the :class:`~hybridstitch.denoiser.Denoiser` interface
(:class:`HookedDenoiser`), so the hooked model runs in the same pipeline, on the same noise, as
every other method. What had to be adapted, and why:

* **State per run.** A hook keeps its state (step counter, cached outputs) across calls and
  assumes the same rows in every call, as in diffusers' pipelines. :class:`HookedPipeline` resets
  it before each call; the rows of one call are one request's images, which share every call of
  the hooked model (``large`` baselines), so the state lines up with the images.
* **Combination with HybridStitch** (``stage="small"``): the hook acts on the small model's calls
  of images in the small-only stage only. Images enter that stage at their own steps, so the
  hooked images are grouped into cohorts by (request, first step of the stage): a cohort keeps
  its members to the end, and each cohort is one call under its own diffusers cache context
  (``CacheMixin.cache_context``: per-context hook state). Only hooks whose state follows the
  context (TaylorSeer, FirstBlockCache) can do this; PAB and FasterCache keep one state per module.
* **Timestep.** PAB and FasterCache ask a callback for "the" timestep; it is the call's (all its
  rows must be at one step, as in a baseline run).
* **FasterCache's row order.** It splits a batch as ``[unconditional..., conditional...]``
  (diffusers' ``torch.cat([negative, positive])``); the pipeline's rows are per image
  ``[unconditional, conditional]``, so the call is reordered around the hook. Its default list
  of batch-split inputs lacks ``pooled_projections``, which SD3 takes: without it the skipped
  unconditional half crashes in ``time_text_embed`` (a size mismatch) from two images on, and
  with one image the two pooled rows silently broadcast over the one conditional row; it is added.
* **What does not run on SD3.** FirstBlockCache fails on SD3's last block
  (``first_block_cache.py:176``: the block is ``context_pre_only`` and returns no text stream,
  and the tail hook subtracts from it); so does TaylorSeer's lite mode and any TaylorSeer pattern
  that takes in the last block (``taylorseer_cache.py``: it stores the block's ``None`` output).
  :func:`unsupported_reason` says so, and the benchmarks report it instead of a row.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import StitchConfig
from .errors import HybridStitchError

KINDS = ("taylorseer", "pab", "fastercache", "firstblock")
CONTEXT_KINDS = ("taylorseer", "firstblock")  # state per diffusers cache context
_FASTERCACHE_SPLIT = ("hidden_states", "encoder_hidden_states", "timestep", "pooled_projections")


@dataclass(frozen=True)
class CacheHook:
    """One diffusers cache hook on one transformer of the pair.

    ``kind``: ``taylorseer``, ``pab``, ``fastercache`` or ``firstblock``. ``model``: ``large`` or
    ``small``. ``stage``: None (every call of that model; baselines over a single model) or
    ``small`` (only images in the small-only stage: the combination with HybridStitch).
    ``options``: keyword arguments of the diffusers config (``TaylorSeerCacheConfig``, ...), as
    pairs; ``blocks="all-but-last"`` (TaylorSeer) caches every transformer block's output but the
    last, which SD3 cannot cache.
    """

    kind: str
    model: str = "large"
    stage: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HybridStitchError(f"unknown cache hook {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.model not in ("large", "small"):
            raise HybridStitchError(f"a cache hook goes on the 'large' or the 'small' transformer, got {self.model!r}")
        if self.stage not in (None, "small"):
            raise HybridStitchError(f"stage must be None (every call) or 'small' (small-only stage), got {self.stage!r}")
        if self.stage is not None and self.kind not in CONTEXT_KINDS:
            raise HybridStitchError(f"{self.kind} keeps one state per module, so it cannot follow images that enter a "
                                    f"stage at different steps; use {' or '.join(CONTEXT_KINDS)} with stage='small'")


@dataclass(frozen=True)
class HookedMethod:
    """A benchmark method: a preset (which model runs when) plus cache hooks."""

    name: str
    preset: str
    hooks: tuple[CacheHook, ...]
    description: str


_TS = (("taylor_factors_dtype", torch.float32),)  # the factors in fp32 on CPU (diffusers' default is bf16)
METHODS: dict[str, HookedMethod] = {m.name: m for m in (
    HookedMethod("taylorseer", "large", (CacheHook("taylorseer", options=_TS),),
                 "large + TaylorSeer, diffusers' defaults (attention outputs; 3 warm-up steps, refresh every 5, order 1)"),
    HookedMethod("taylorseer-blocks", "large",
                 (CacheHook("taylorseer", options=_TS + (("blocks", "all-but-last"), ("cache_interval", 3))),),
                 "large + TaylorSeer on whole blocks (all but the last; 3 warm-up steps, refresh every 3, order 1)"),
    HookedMethod("pab", "large", (CacheHook("pab", options=(("spatial_attention_block_skip_range", 2),)),),
                 "large + Pyramid Attention Broadcast (attention reused every other step for timesteps 100-800)"),
    HookedMethod("fastercache", "large", (CacheHook("fastercache"),),
                 "large + FasterCache, diffusers' defaults (attention every 2nd step below t 681, CFG-Cache every 5th below 641)"),
    HookedMethod("firstblock", "large", (CacheHook("firstblock", options=(("threshold", 0.05),)),),
                 "large + FirstBlockCache (threshold 0.05)"),
)}


def combination(preset: str, hook: CacheHook) -> HookedMethod:
    """A HybridStitch preset with ``hook`` on its small-only stage: ``"<preset>+<kind>"``."""
    if hook.stage != "small" or hook.model != "small":
        raise HybridStitchError("a combination puts the hook on the small model's small-only stage: "
                                "CacheHook(kind, model='small', stage='small')")
    return HookedMethod(f"{preset}+{hook.kind}", preset, (hook,), f"{preset} with {hook.kind} on its small-only steps")


def method(name: str) -> HookedMethod:
    """A hooked method by name: :data:`METHODS`, or ``"<preset>+taylorseer"`` (a combination)."""
    if name in METHODS:
        return METHODS[name]
    preset, _, kind = name.partition("+")
    if kind == "taylorseer" and preset in StitchConfig.preset_names():
        return combination(preset, CacheHook("taylorseer", model="small", stage="small",
                                             options=_TS + (("blocks", "all-but-last"), ("cache_interval", 2),
                                                            ("disable_cache_before_step", 2))))
    raise HybridStitchError(f"unknown cached method {name!r}; choose one of {', '.join(METHODS)} or '<preset>+taylorseer'")


def is_method(name: str) -> bool:
    try:
        method(name)
        return True
    except HybridStitchError:
        return False


def unsupported_reason(kind: str) -> str | None:
    """Why a hook cannot run on SD3's transformer (None: it runs)."""
    if kind == "firstblock":
        return ("FirstBlockCache fails on SD3's last block (diffusers hooks/first_block_cache.py:176, TypeError: the "
                "block is context_pre_only and returns no text stream, and the tail hook subtracts from it)")
    return None


# -- attaching -----------------------------------------------------------------------------------------------


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its own modules (for hooks) and the same parameter and buffer tensors."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _diffusers_config(hook: CacheHook, model: torch.nn.Module, timestep):
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig,
                                 TaylorSeerCacheConfig)

    options = dict(hook.options)
    if hook.kind == "taylorseer":
        if options.pop("blocks", None) == "all-but-last":
            last = len(model.transformer_blocks) - 1
            options["cache_identifiers"] = [rf"^transformer_blocks\.{i}$" for i in range(last)]
        return TaylorSeerCacheConfig(**options)
    if hook.kind == "pab":
        return PyramidAttentionBroadcastConfig(current_timestep_callback=timestep, **options)
    if hook.kind == "fastercache":
        options.setdefault("attention_weight_callback", lambda _: 0.5)  # diffusers' default, without its warning
        return FasterCacheConfig(current_timestep_callback=timestep, tensor_format="BCHW",
                                 _unconditional_conditional_input_kwargs_identifiers=list(_FASTERCACHE_SPLIT), **options)
    return FirstBlockCacheConfig(**options)


def attach(model: torch.nn.Module, hook: CacheHook, timestep) -> None:
    """diffusers' own ``apply_*`` for ``hook`` on ``model``; ``timestep()`` is the callback PAB and FasterCache ask."""
    from diffusers.hooks import (apply_faster_cache, apply_first_block_cache, apply_pyramid_attention_broadcast,
                                 apply_taylorseer_cache)

    apply = {"taylorseer": apply_taylorseer_cache, "pab": apply_pyramid_attention_broadcast,
             "fastercache": apply_faster_cache, "firstblock": apply_first_block_cache}[hook.kind]
    apply(model, _diffusers_config(hook, model, timestep))


class HookedDenoiser:
    """A torch denoiser whose transformer runs with a diffusers cache hook (see the module docstring).

    Full forwards go through the hooked copy; everything else (the masked large model's calls,
    ``bucket_for``, ``validate_request``) through the plain one, so a hooked large model can only
    serve methods that call it in full (``large``)."""

    def __init__(self, base, hook: CacheHook):
        self.base, self.hook = base, hook
        self.name, self.spec = base.name, base.spec
        self.backend = getattr(base, "backend", "torch")
        self.model = shared_copy(base.model)
        self._timestep: float | None = None
        attach(self.model, hook, lambda: self._timestep)
        self.calls = 0  # hooked calls since the last reset

    def __getattr__(self, name: str):  # forward_store, forward_masked, bucket_for, validate_request, device, dtype
        return getattr(self.base, name)

    def reset(self) -> None:
        """Forget every cached output (diffusers' ``reset_stateful_hooks``): before each run."""
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)
        self.calls = 0

    @torch.no_grad()
    def forward(self, latents, prompt_embeds, pooled, timestep):
        if self.hook.stage is not None:
            raise HybridStitchError("a stage-bound cache hook needs the images of each call: this step function does "
                                    "not pass them (forward_samples)")
        return self._hooked("run", latents, prompt_embeds, pooled, timestep)

    @torch.no_grad()
    def forward_samples(self, samples: Sequence, latents, prompt_embeds, pooled, timestep):
        """The call of ``samples`` (rows side by side, in order): the images in the hook's stage through the
        hooked model, one call per cohort under its own cache context; the others through the plain model."""
        if self.hook.stage is None:
            return self.forward(latents, prompt_embeds, pooled, timestep)
        starts, groups = [], {}
        row = 0
        for s in samples:
            starts.append(row)
            key = None
            if s.stage.kind == self.hook.stage:
                key = f"{id(s.owner)}:{s.policy.switch_steps[-1] if s.policy.switch_steps else 0}"
            groups.setdefault(key, []).append(len(starts) - 1)
            row += s.rows
        out: list[torch.Tensor | None] = [None] * len(samples)
        inputs = (latents, prompt_embeds, pooled, timestep)
        for key, members in groups.items():
            rows = torch.cat([torch.arange(starts[i], starts[i] + samples[i].rows) for i in members])
            args = [x[rows] for x in inputs]
            v = self.base.forward(*args) if key is None else self._hooked(key, *args)
            for i, part in zip(members, torch.split(v, [samples[i].rows for i in members])):
                out[i] = part
        return torch.cat(out)

    def _hooked(self, context: str, latents, prompt_embeds, pooled, timestep):
        from diffusers.models.cache_utils import CacheMixin

        if not bool((timestep == timestep[0]).all()):
            raise HybridStitchError(f"the {self.hook.kind} hook runs one timestep per call; this call's rows are at "
                                    f"{sorted(set(timestep.tolist()))}")
        self._timestep = float(timestep[0])
        order = None
        if self.hook.kind == "fastercache":  # per-image [uncond, cond] rows -> [uncond..., cond...], and back
            if latents.shape[0] % 2:
                raise HybridStitchError("FasterCache approximates the unconditional half of a guided batch: "
                                        "run it with guidance_scale > 1")
            order = torch.cat([torch.arange(0, latents.shape[0], 2), torch.arange(1, latents.shape[0], 2)])
            latents, prompt_embeds, pooled, timestep = (x[order] for x in (latents, prompt_embeds, pooled, timestep))
        self.calls += 1
        with CacheMixin.cache_context(self.model, context):  # SD3's transformer lacks the mixin: its method, unbound
            v = self.model(hidden_states=latents.to(self.base.dtype), encoder_hidden_states=prompt_embeds.to(self.base.dtype),
                           pooled_projections=pooled.to(self.base.dtype), timestep=timestep, return_dict=False)[0]
        if order is not None:
            v = v[torch.argsort(order)]
        return v


@dataclass
class HookedPipeline:
    """A :class:`~hybridstitch.pipeline.HybridStitchPipeline` whose transformers carry cache hooks; every call
    starts from reset hooks. Attributes other than ``__call__`` are the wrapped pipeline's."""

    pipe: Any
    method: HookedMethod
    denoisers: list = field(default_factory=list)

    def __call__(self, *args, **kwargs):
        for d in self.denoisers:
            d.reset()
        kwargs.setdefault("config", self.method.preset)
        return self.pipe(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)


def hooked_pipeline(pipe, name_or_method) -> HookedPipeline:
    """``pipe`` (torch backend) with the method's hooks: a shallow copy whose large / small denoisers are
    :class:`HookedDenoiser` s over the same weights. ``pipe`` itself is left as it was."""
    m = name_or_method if isinstance(name_or_method, HookedMethod) else method(name_or_method)
    for h in m.hooks:
        why = unsupported_reason(h.kind)
        if why:
            raise HybridStitchError(f"{m.name}: {why}")
    if getattr(pipe.large, "backend", None) != "torch" or not hasattr(pipe.large, "model"):
        raise HybridStitchError("diffusers' cache hooks run on the torch backend (HybridStitchPipeline.from_pretrained); "
                                "exported engines have no modules to hook")
    config = StitchConfig.preset(m.preset)
    clone = copy.copy(pipe)
    hooked = []
    for h in m.hooks:
        if h.model == "large" and config.method != "large":
            raise HybridStitchError(f"{m.name}: a hook on the large model runs with method 'large' only (the masked "
                                    f"large calls keep their own KV cache); {m.preset!r} is {config.method!r}")
        den = HookedDenoiser(getattr(pipe, h.model), h)
        setattr(clone, h.model, den)
        hooked.append(den)
    return HookedPipeline(clone, m, hooked)


__all__ = ["CacheHook", "HookedDenoiser", "HookedMethod", "HookedPipeline", "METHODS", "attach", "combination",
           "hooked_pipeline", "is_method", "method", "shared_copy", "unsupported_reason"]
