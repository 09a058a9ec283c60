"""One denoising step of one stage over the two denoisers, plus classifier-free guidance.

In the manner of gpt-fast's ``decode_one_token``: a small function of tensors and denoisers,
no loop state, so the pipeline's loop stays short and a step can be compiled or captured.

    v = denoise_step(large, small, stage, latents, cond, t, guidance_scale, cache=cache, index=index)

Per stage (DESIGN.md section 2): ``large`` runs the large model on all tokens (storing the KV
cache when one is given); ``small`` the small model; ``masked`` the small model on all tokens and
the large one on the masked tokens only (over the cache), whose output overwrites the small
one's there -- or, for the FullLarge ablation (``full_large=True``), the large model on all
tokens with only the masked region merged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .denoiser import Denoiser, MaskedDenoiser
from .policy import Stage
from .tokens import gather_tokens, merge_masked, patchify

T = TypeVar("T")
# (call name, the call) -> the call's result; the pipeline's timer records per-call seconds.
Timer = Callable[[str, Callable[[], T]], T]


def untimed(name: str, fn: Callable[[], T]) -> T:
    return fn()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so per-call timings count the device time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_timer(seconds: dict[str, float], device: torch.device) -> Timer:
    """A :data:`Timer` that adds each call's wall time (device work included) to ``seconds[name]``."""

    def timed(name: str, fn: Callable[[], T]) -> T:
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        return out

    return timed


def model_velocity(
    large: MaskedDenoiser,
    small: Denoiser,
    stage: Stage,
    x: torch.Tensor,  # [B', C, h, w], CFG-doubled when guidance is on
    cond: Any,  # Conditioning: prompt_embeds [B', T, D], pooled [B', P]
    timestep: torch.Tensor,  # [B'], sigma * 1000
    cache: Any = None,
    index: torch.Tensor | None = None,  # [B', k], masked stages only
    full_large: bool = False,
    timed: Timer = untimed,
) -> torch.Tensor:
    """The models' velocity for one step before guidance: [B', C, h, w]."""
    args = (x, cond.prompt_embeds, cond.pooled, timestep)
    if stage.kind == "large":
        return timed("large", lambda: large.forward(*args, cache=cache))
    if stage.kind == "small":
        return timed("small", lambda: small.forward(*args))
    assert index is not None, "a masked stage needs the masked token positions"
    p = large.spec.patch_size
    v_small = timed("small", lambda: small.forward(*args))
    if full_large:  # FullLarge ablation: the whole large model, only the masked region merged
        v_large = timed("large", lambda: large.forward(*args))
        tokens = gather_tokens(patchify(v_large, p), index)
    else:
        tokens = timed("large_masked", lambda: large.forward_masked(*args, index=index, cache=cache))
    return merge_masked(v_small, tokens, index, p)


def guide(v: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over a batch laid out [uncond..., cond...]: [2B, ...] -> [B, ...]."""
    v_uncond, v_text = v.chunk(2)
    return v_uncond + guidance_scale * (v_text - v_uncond)


def denoise_step(
    large: MaskedDenoiser,
    small: Denoiser,
    stage: Stage,
    latents: torch.Tensor,  # [B, C, h, w]
    cond: Any,  # CFG-batched when guidance_scale > 1: [uncond..., cond...]
    t: torch.Tensor,  # scalar timestep of this step
    guidance_scale: float,
    cache: Any = None,
    index: torch.Tensor | None = None,  # [B, k]: one mask per sample serves both CFG halves
    full_large: bool = False,
    timed: Timer = untimed,
) -> torch.Tensor:
    """The guided velocity of one step: [B, C, h, w]."""
    do_cfg = guidance_scale > 1.0
    x = torch.cat([latents, latents]) if do_cfg else latents  # [B', C, h, w]
    if index is not None and do_cfg:
        index = torch.cat([index, index])
    v = model_velocity(large, small, stage, x, cond, t.expand(x.shape[0]), cache=cache, index=index,
                       full_large=full_large, timed=timed)
    return guide(v, guidance_scale) if do_cfg else v


__all__ = ["Timer", "call_timer", "denoise_step", "guide", "model_velocity", "synchronize", "untimed"]
