"""One image in flight: everything the method decides, per sample.

A :class:`Sample` carries its own latents, text conditioning, guidance scale, step count and
timesteps, stage policy (so ``d_i``, the stage and the switch steps are its own), mask selector,
KV caches and trace. Nothing in it depends on the other samples that share its engine calls, so
an image is the same alone or in any batch (``hybridstitch.step`` runs the calls).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import StitchConfig
from .errors import HybridStitchError
from .masks import MaskSelector
from .policy import ReplayPolicy, Stage, StagePolicy
from .trace import Trace


@dataclass(frozen=True)
class Timesteps:
    """The timesteps and sigmas of one step count: a flow-matching Euler schedule, computed once by
    the scheduler (``set_timesteps``) and shared by every sample with that step count."""

    timesteps: torch.Tensor  # [T]: sigma * 1000, what the transformers take
    sigmas: torch.Tensor  # [T + 1], float32, ending at 0
    # The same numbers as Python floats, read once: a step needs them on the host (records, grouping,
    # scalar arithmetic) and reading a device tensor element by element would sync each time.
    timestep_values: tuple[float, ...] = field(init=False)
    sigma_values: tuple[float, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "timestep_values", tuple(self.timesteps.tolist()))
        object.__setattr__(self, "sigma_values", tuple(self.sigmas.tolist()))

    @classmethod
    def of(cls, scheduler, num_steps: int, device) -> "Timesteps":
        config = getattr(scheduler, "config", {})
        if config.get("stochastic_sampling", False):
            raise HybridStitchError(
                "the scheduler is configured with stochastic_sampling, which HybridStitch's Euler step does not "
                "implement; use FlowMatchEulerDiscreteScheduler's deterministic default (stochastic_sampling=False)"
            )
        private = copy.deepcopy(scheduler)  # set_timesteps mutates the scheduler
        private.set_timesteps(num_steps, device=device)
        return cls(private.timesteps, private.sigmas)


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i``, with FlowMatchEulerDiscreteScheduler's own
    arithmetic (float32 sample, the result in the velocity's dtype), so it matches its ``step``
    bit for bit."""
    return (latents.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)


@dataclass
class Sample:
    """The state of one image between steps."""

    id: int  # admission order: a call's rows are in this order
    latents: torch.Tensor  # [1, C, h, w]
    prompt_embeds: torch.Tensor  # [R, T, D]: R = 2 with guidance ([unconditional, conditional]), else 1
    pooled: torch.Tensor  # [R, P]
    guidance_scale: float
    config: StitchConfig
    schedule: Timesteps
    policy: StagePolicy
    masks: MaskSelector
    trace: Trace
    num_tokens: int  # N
    step: int = 0
    caches: Any = None  # kvcache.Rows (or a dict of [R, H, N, D] tensors): this sample's large K/V
    x0_prev: torch.Tensor | None = None  # [1, C, h, w] float32
    record_masks: bool = False
    owner: Any = None  # the request it belongs to (the scheduler's)
    stage: Stage | None = None  # the stage of the step being run
    index: torch.Tensor | None = None  # [1, k]: the masked positions of that step
    error: Exception | None = None  # why this sample stopped (a failed engine call, non-finite latents)
    extra: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def guided(self) -> bool:
        return self.rows == 2

    @property
    def done(self) -> bool:
        return self.error is not None or self.step >= self.policy.num_steps

    @property
    def timestep(self) -> torch.Tensor:
        return self.schedule.timesteps[self.step]


def new_sample(id: int, latents: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
               guidance_scale: float, config: StitchConfig, schedule: Timesteps, patch: int, trace: Trace,
               replay: list[Stage] | None = None, record_masks: bool = False, owner: Any = None) -> Sample:
    """A sample at step 0. ``prompt_embeds`` / ``pooled``: its rows ([unconditional, conditional]
    when ``guidance_scale > 1``). ``replay``: a fixed stage per step instead of the stage policy."""
    steps = len(schedule.timesteps)
    policy = StagePolicy(config, steps, schedule.sigmas) if replay is None else ReplayPolicy(config, replay)
    _, _, h, w = latents.shape
    return Sample(id=id, latents=latents, prompt_embeds=prompt_embeds, pooled=pooled, guidance_scale=guidance_scale,
                  config=config, schedule=schedule, policy=policy, masks=MaskSelector.for_config(config, patch),
                  trace=trace, num_tokens=(h // patch) * (w // patch), record_masks=record_masks, owner=owner)



def draw_noise(shape: tuple[int, ...], generator) -> torch.Tensor:
    """Float32 noise drawn on the generator's device (the CPU without one), so a CUDA generator
    works as in diffusers, and one generator per image gives each image its own stream."""
    from diffusers.utils.torch_utils import randn_tensor

    first = generator[0] if isinstance(generator, list) else generator
    device = first.device if first is not None else torch.device("cpu")
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


__all__ = ["Sample", "Timesteps", "draw_noise", "euler_step", "new_sample"]
