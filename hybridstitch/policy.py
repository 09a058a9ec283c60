"""The stage policy: which models run at the next step, given the differences seen so far.

Pure Python over floats, so it is tested on scripted difference sequences without any model.
The pipeline asks :meth:`StagePolicy.stage_for_step` before each step and reports the step's
difference ``d_i`` afterwards with :meth:`StagePolicy.observe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import StitchConfig
from .errors import HybridStitchError


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    ``index`` is 1-based as in the paper (1 = large, 2.. = masked, last = small only).
    ``mask_ratio`` is set for masked stages only.
    """

    index: int
    kind: str  # "large" | "masked" | "small"
    mask_ratio: float | None = None

    @property
    def runs_large(self) -> bool:
        return self.kind in ("large", "masked")

    @property
    def runs_small(self) -> bool:
        return self.kind in ("masked", "small")


LARGE = Stage(1, "large")


def tstitch_first_large_step(num_steps: int, small_fraction: float) -> int:
    """T-Stitch's switch: the 0-based index of the first large step, ``floor(f * T + 0.5)``.

    With 50 steps and 0.4 that is step 20: steps 0-19 run small, 20-49 large.
    """
    return min(num_steps, int(math.floor(small_fraction * num_steps + 0.5)))


class StagePolicy:
    """Stage transitions for one request (DESIGN.md section 2)."""

    def __init__(self, config: StitchConfig, num_steps: int, sigmas=None):
        self.config = config
        self.num_steps = num_steps
        # difference="sigma": d_i is compared per unit of sigma, so the schedule's sigmas are needed
        self._sigmas = None if sigmas is None else [float(s) for s in sigmas]
        self._stages = self._build_stages(config)
        self._pos = 0  # index into self._stages
        self._prev_e: float | None = None  # SRDiffusion: tanh(d_{i-1})
        self.switch_steps: list[int] = []  # first step of each stage after the first
        if config.method == "t-stitch":
            self._tstitch_switch = tstitch_first_large_step(num_steps, config.tstitch_small_fraction)
            if self._tstitch_switch == 0:
                self._pos = 1  # all large

    @staticmethod
    def _build_stages(config: StitchConfig) -> list[Stage]:
        if config.method == "large":
            return [LARGE]
        if config.method == "small":
            return [Stage(1, "small")]
        if config.method == "t-stitch":
            return [Stage(1, "small"), Stage(2, "large")]
        if config.method == "srdiffusion":
            return [LARGE, Stage(2, "small")]
        stages = [LARGE]
        for j, r in enumerate(config.mask_ratios):
            stages.append(Stage(2 + j, "masked", r))
        stages.append(Stage(2 + len(config.mask_ratios), "small"))
        return stages

    @property
    def stage(self) -> Stage:
        return self._stages[self._pos]

    @property
    def stages(self) -> list[Stage]:
        return list(self._stages)

    def stage_for_step(self, step: int) -> Stage:
        if self.config.method == "t-stitch" and self._pos == 0 and step >= self._tstitch_switch:
            self._advance(step)
        return self.stage

    def observe(self, step: int, d: float | None) -> None:
        """Report step ``step``'s difference ``d_i`` (None on the first step); may move one stage on.

        The new stage applies from step ``step + 1``.
        """
        method = self.config.method
        if d is None or method in ("large", "small", "t-stitch"):
            return
        if method == "srdiffusion":
            e = math.tanh(d)
            if self._pos == 0 and self._prev_e is not None:
                drop = self._prev_e - e
                if 0.0 <= drop < self.config.srdiffusion_threshold:
                    self._advance(step + 1)
            self._prev_e = e
            return
        # HybridStitch: leave stage j (1-based) when d falls below tau_j; one stage per step.
        d = self.normalized(step, d)
        if self._pos < len(self._stages) - 1 and d < self.config.thresholds[self._pos]:
            self._advance(step + 1)

    def normalized(self, step: int, d: float) -> float:
        """``d_i`` as the thresholds read it: as is (``difference="step"``), or per unit of sigma,
        ``d_i / (sigma_{i-1} - sigma_i)`` (``"sigma"``), the sigma interval the two x0 estimates span."""
        if self.config.difference != "sigma":
            return d
        if self._sigmas is None or len(self._sigmas) <= step:
            raise HybridStitchError("difference='sigma' needs the schedule's sigmas (one per step and the final 0): "
                                    "make the policy with StagePolicy(config, num_steps, sigmas)")
        span = self._sigmas[step - 1] - self._sigmas[step]
        return d / span if span > 0 else math.inf

    def _advance(self, first_step: int) -> None:
        self._pos += 1
        if first_step < self.num_steps:
            self.switch_steps.append(first_step)


class ReplayPolicy(StagePolicy):
    """A fixed stage per step (given switch steps), ignoring the differences: latency benchmarks
    replay a measured schedule on other models with it."""

    def __init__(self, config: StitchConfig, schedule: list[Stage]):
        super().__init__(config, len(schedule))
        self._schedule = list(schedule)
        self.switch_steps = [i for i in range(1, len(schedule)) if schedule[i].index != schedule[i - 1].index]

    @property
    def stage(self) -> Stage:
        return self._schedule[0]

    def stage_for_step(self, step: int) -> Stage:
        return self._schedule[step]

    def observe(self, step: int, d: float | None) -> None:
        """Differences are traced but do not change a replayed schedule."""
