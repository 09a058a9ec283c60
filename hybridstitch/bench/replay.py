"""Replayed schedules: the stages of a run given as switch steps instead of decided from ``d_i``.

Latency at the real sizes is measured on random-weight models whose difference curve means
nothing, so the switch steps are given (``--switch-steps 10 30``: large until step 10, masked
until step 30, small after) and every method runs the stages it would run on real weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridstitch.config import PRESETS, StitchConfig
from hybridstitch.errors import HybridStitchError
from hybridstitch.policy import LARGE, Stage, tstitch_first_large_step


@dataclass(frozen=True)
class ReplaySwitches:
    """Given switch steps (0-based first step of each later stage), independent of ``d_i``.

    ``stitch``: ``(s_1, s_last)``: large before ``s_1``, masked stage(s) until ``s_last``, small
    after; several mask ratios split ``[s_1, s_last)`` evenly unless ``multi`` gives all
    ``n + 1`` switch steps. ``tstitch``: T-Stitch's first large step (small before it).
    ``srdiffusion``: SRDiffusion's first small step (large before it).
    """

    stitch: tuple[int, int]
    tstitch: int
    srdiffusion: int
    multi: tuple[int, ...] | None = None

    @classmethod
    def default(cls, num_steps: int) -> "ReplaySwitches":
        """Paper-like defaults: large for 30 % of the steps, masked to 70 %; T-Stitch 40 % small
        (its preset); SRDiffusion large for the first half."""
        return cls(
            stitch=(max(2, round(0.3 * num_steps)), max(2, round(0.7 * num_steps))),
            tstitch=tstitch_first_large_step(num_steps, PRESETS["t-stitch"]["tstitch_small_fraction"]),
            srdiffusion=round(0.5 * num_steps),
        )

    def for_config(self, config: StitchConfig, num_steps: int) -> list[int]:
        """The switch steps of ``config``'s stages, ``len(mask_ratios) + 1`` for HybridStitch."""
        if config.method in ("large", "small"):
            return []
        if config.method == "t-stitch":
            return [self.tstitch]
        if config.method == "srdiffusion":
            return [self.srdiffusion]
        n = len(config.mask_ratios)
        if n > 1 and self.multi is not None:
            if len(self.multi) != n + 1:
                raise HybridStitchError(
                    f"{config.name} has {n} mask ratios and needs {n + 1} switch steps, got --multi-switch-steps {list(self.multi)}"
                )
            return list(self.multi)
        s1, last = self.stitch
        return [s1 + round(j * (last - s1) / n) for j in range(n)] + [last]


def replay_stages(config: StitchConfig, num_steps: int, switches: ReplaySwitches) -> list[Stage]:
    """The stage of every step of ``config`` under the replayed switch steps."""
    s = switches.for_config(config, num_steps)
    if any(a > b for a, b in zip(s, s[1:])) or any(not 0 <= x <= num_steps for x in s):
        raise HybridStitchError(f"{config.name}: switch steps must be non-decreasing within 0..{num_steps}, got {s}")
    if config.method == "large":
        return [LARGE] * num_steps
    if config.method == "small":
        return [Stage(1, "small")] * num_steps
    if config.method == "t-stitch":
        return [Stage(1, "small") if i < s[0] else Stage(2, "large") for i in range(num_steps)]
    if config.method == "srdiffusion":
        return [LARGE if i < s[0] else Stage(2, "small") for i in range(num_steps)]
    if s[0] < 2 and s[0] < s[-1]:
        raise HybridStitchError(
            f"{config.name}: the first masked step must be >= 2 (a mask needs two earlier x0 estimates), got switch steps {s}"
        )
    stages = []
    for i in range(num_steps):
        j = sum(1 for x in s if x <= i)  # stages entered so far
        if j == 0:
            stages.append(LARGE)
        elif j <= len(config.mask_ratios):
            stages.append(Stage(1 + j, "masked", config.mask_ratios[j - 1]))
        else:
            stages.append(Stage(2 + len(config.mask_ratios), "small"))
    return stages


def replay_denoise(large, small, scheduler, latents, cond, config: StitchConfig, stages: list[Stage],
                   guidance_scale: float, device=None):
    """The pipeline's denoising loop with given stages (:meth:`HybridStitchPipeline.denoise` with a
    ``schedule``), on denoisers built outside a pipeline. ``latents`` [B, C, h, w]; ``cond``:
    :class:`~hybridstitch.conditioning.Conditioning`, CFG-batched when guidance is on.
    Returns ``(latents, traces)``: one trace per image, ``total_seconds`` the whole call.
    """
    from hybridstitch.pipeline import HybridStitchPipeline

    pipe = HybridStitchPipeline(large, small, scheduler, device=device or latents.device)
    return pipe.denoise(latents, cond, config, len(stages), guidance_scale, schedule=stages)
