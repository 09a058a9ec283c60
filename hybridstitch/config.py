"""StitchConfig: which models run at which step, with the paper's operating points as presets.

A run is a sequence of stages (DESIGN.md section 2):

    stage 1          large model on all tokens (also fills the KV cache)
    stage 2 .. n+1   small model on all tokens + large model on the top ``mask_ratios[j]`` share
                     of tokens; the large output overwrites the small one there
    stage n+2        small model only

With ``mask_ratios = (r_1, ..., r_n)`` there are ``n + 1`` thresholds ``tau_1 > ... > tau_{n+1}``:
the run leaves stage ``j`` after the first step whose difference ``d_i`` (Eq. 9) is below
``tau_j``, one stage per step, never skipping a masked stage.

Cache freshness (beyond the paper): a masked step attends over the large model's K/V of the
unmasked tokens as last computed, so an entry's *age* (steps since the large model computed that
token) is its staleness. ``refresh_share`` / ``age_weight`` steer the mask towards old entries;
``refresh_every`` / ``refresh_age`` turn a masked step into a full large step that rewrites the
whole cache. ``difference="sigma"`` compares ``d_i`` per unit of sigma, so thresholds hold across
step counts (:class:`~hybridstitch.policy.StagePolicy`).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Literal

from .errors import HybridStitchError

Method = Literal["hybridstitch", "large", "small", "t-stitch", "srdiffusion"]
Difference = Literal["step", "sigma"]
METHODS = ("hybridstitch", "large", "small", "t-stitch", "srdiffusion")


@dataclass(frozen=True)
class StitchConfig:
    """What to run at each step.

    Attributes:
        method: ``hybridstitch`` (the method), or a baseline: ``large`` / ``small`` (one model
            throughout), ``t-stitch`` (small first, then large), ``srdiffusion`` (large first,
            then small once its criterion fires).
        mask_ratios: share of image tokens the large model refines in each masked stage,
            in (0, 1], non-increasing. HybridStitch only.
        thresholds: ``len(mask_ratios) + 1`` stage-transition thresholds on ``d_i``,
            strictly decreasing, >= 0 (a threshold of 0 never fires). HybridStitch only.
        mask_mode: ``dynamic`` (recompute the mask every masked step, the paper's default) or
            ``static`` (freeze the token scores on entering stage 2: the StaticMask ablation).
        stage2_large: ``masked`` (large model on the masked tokens only, with the KV cache) or
            ``full`` (large model on all tokens, only the masked region merged: the FullLarge
            ablation).
        tstitch_small_fraction: T-Stitch's share of steps run by the small model first. With
            ``T`` steps the first large step is ``floor(f * T + 0.5)`` (0-based): 50 steps at
            0.4 run steps 0-19 small and 20-49 large.
        srdiffusion_threshold: SRDiffusion's switch criterion. With ``e_i = tanh(d_i)``, the run
            switches to the small model after step ``i`` (i >= 2) when
            ``0 <= e_{i-1} - e_i < srdiffusion_threshold``: the difference has stopped falling,
            the sketch is done. Paper setting 0.005.
        refresh_share: share of each masked step's ``k`` tokens given to the oldest cache entries
            instead of the most unstable tokens (round-robin refresh): ``round(share * k)`` tokens,
            oldest first (ties: lowest position), the rest by score. 0 (default) is the paper's mask.
        age_weight: add cache age to the mask score: ``score_j / mean(score) + age_weight * age_j``
            (age in steps). 0 (default) ranks by instability alone.
        refresh_every: ``m`` > 0 turns the masked step after every ``m`` masked steps into a full
            large step (all tokens, the whole cache rewritten); 0 (default) never.
        refresh_age: ``A`` > 0 turns a masked step into a full large step when the mean cache age
            over the image tokens would exceed ``A`` steps (an entry written at the step before is
            1 step old, so ``A`` >= 1); 0 (default) never.
        difference: ``step`` (Eq. 9's ``d_i``, the paper's) or ``sigma``: the stage thresholds are
            compared with ``d_i / (sigma_{i-1} - sigma_i)``, the change per unit of sigma, which
            does not shrink as the step count grows. HybridStitch only.
        name: the preset name, or ``custom``.
    """

    method: Method = "hybridstitch"
    mask_ratios: tuple[float, ...] = (0.3,)
    thresholds: tuple[float, ...] = (0.5, 0.3)
    mask_mode: Literal["dynamic", "static"] = "dynamic"
    stage2_large: Literal["masked", "full"] = "masked"
    tstitch_small_fraction: float = 0.4
    srdiffusion_threshold: float = 0.005
    refresh_share: float = 0.0
    age_weight: float = 0.0
    refresh_every: int = 0
    refresh_age: float = 0.0
    difference: Difference = "step"
    name: str = "custom"

    def __post_init__(self) -> None:
        # Accept lists from JSON/CLI; store tuples so configs stay hashable.
        object.__setattr__(self, "mask_ratios", tuple(float(r) for r in self.mask_ratios))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if self.method not in METHODS:
            raise HybridStitchError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.mask_mode not in ("dynamic", "static"):
            raise HybridStitchError(f"mask_mode must be 'dynamic' or 'static', got {self.mask_mode!r}")
        if self.stage2_large not in ("masked", "full"):
            raise HybridStitchError(f"stage2_large must be 'masked' or 'full', got {self.stage2_large!r}")
        if not 0.0 <= self.tstitch_small_fraction <= 1.0:
            raise HybridStitchError(
                f"tstitch_small_fraction must be in [0, 1], got {self.tstitch_small_fraction}"
            )
        if not self.srdiffusion_threshold >= 0.0:
            raise HybridStitchError(f"srdiffusion_threshold must be >= 0, got {self.srdiffusion_threshold}")
        if self.method == "hybridstitch":
            self._validate_stitch()
        self._validate_freshness()

    def _validate_stitch(self) -> None:
        ratios, taus = self.mask_ratios, self.thresholds
        if not ratios:
            raise HybridStitchError(
                "HybridStitch needs at least one mask ratio, e.g. mask_ratios=(0.3,), thresholds=(0.5, 0.3); "
                "use method='large' or 'small' for a single model"
            )
        if len(taus) != len(ratios) + 1:
            raise HybridStitchError(
                f"HybridStitch needs one more threshold than mask ratios: got {len(ratios)} ratio(s) "
                f"{list(ratios)} and {len(taus)} threshold(s) {list(taus)}; e.g. mask_ratios=(0.3,) "
                "takes thresholds=(0.5, 0.3)"
            )
        for r in ratios:
            if not (0.0 < r <= 1.0) or math.isnan(r):
                raise HybridStitchError(f"mask ratios must be in (0, 1], got {r} in {list(ratios)}")
        if any(a < b for a, b in zip(ratios, ratios[1:])):
            raise HybridStitchError(f"mask ratios must be non-increasing (larger masks first), got {list(ratios)}")
        for t in taus:
            if not t >= 0.0:
                raise HybridStitchError(f"thresholds must be >= 0, got {t} in {list(taus)}")
        if any(a <= b for a, b in zip(taus, taus[1:])):
            raise HybridStitchError(f"thresholds must be strictly decreasing, got {list(taus)}")

    def _validate_freshness(self) -> None:
        share, weight, every, age = self.refresh_share, self.age_weight, self.refresh_every, self.refresh_age
        if not (isinstance(share, (int, float)) and 0.0 <= share <= 1.0):
            raise HybridStitchError(f"refresh_share must be a number in [0, 1] (a share of the masked tokens), got {share!r}")
        if not (isinstance(weight, (int, float)) and 0.0 <= weight < math.inf):
            raise HybridStitchError(f"age_weight must be a finite number >= 0 (0: rank by instability alone), got {weight!r}")
        try:
            every = operator.index(every) if not isinstance(every, bool) else None
        except TypeError:
            every = None
        if every is None or every < 0:
            raise HybridStitchError(f"refresh_every must be an integer >= 0 (masked steps between full large steps; "
                                    f"0: never), got {self.refresh_every!r}")
        object.__setattr__(self, "refresh_every", every)
        if not (isinstance(age, (int, float)) and (age == 0.0 or 1.0 <= age < math.inf)):
            raise HybridStitchError(f"refresh_age must be 0 (never) or a mean cache age >= 1 step (the youngest an "
                                    f"entry can be at a masked step), got {age!r}")
        if self.difference not in ("step", "sigma"):
            raise HybridStitchError(f"difference must be 'step' (Eq. 9) or 'sigma' (per unit of sigma), got {self.difference!r}")
        if self.method != "hybridstitch" and self.difference != "step":
            raise HybridStitchError(f"difference='sigma' normalises HybridStitch's stage thresholds; method {self.method!r} "
                                    "does not use them: keep difference='step'")
        if not self.has_freshness:
            return
        if not self.uses_masked_large:
            raise HybridStitchError(
                "refresh_share, age_weight, refresh_every and refresh_age keep the masked large forward's KV cache "
                f"fresh; they need method='hybridstitch' with stage2_large='masked' (got method={self.method!r}, "
                f"stage2_large={self.stage2_large!r}): set them to 0 or use a masked stage")
        if (share or weight) and self.mask_mode == "static":
            raise HybridStitchError("refresh_share and age_weight change the mask every step; the StaticMask ablation "
                                    "freezes it: use mask_mode='dynamic', or refresh_every / refresh_age with a static mask")

    # -- presets -------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> "StitchConfig":
        """A named operating point: ``StitchConfig.preset("hybridstitch-30")``."""
        try:
            kwargs = PRESETS[name]
        except KeyError:
            raise HybridStitchError(
                f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} "
                "(or build a custom StitchConfig(mask_ratios=..., thresholds=...))"
            ) from None
        return cls(name=name, **kwargs)

    @staticmethod
    def preset_names() -> list[str]:
        return list(PRESETS)

    def replace(self, **changes) -> "StitchConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def has_masked_stage(self) -> bool:
        """A stage 2 exists (small model on all tokens + large model on the masked region), so the
        run selects masks from token scores. True for the FullLarge ablation too."""
        return self.method == "hybridstitch"

    @property
    def uses_masked_large(self) -> bool:
        """The large model runs masked (on the masked tokens only, over the KV cache) in stage 2.
        False for the FullLarge ablation, which runs the large model on all tokens there."""
        return self.method == "hybridstitch" and self.stage2_large == "masked"

    @property
    def has_freshness(self) -> bool:
        """Any cache-freshness option is on (see the class docstring)."""
        return bool(self.refresh_share or self.age_weight or self.refresh_every or self.refresh_age)

    @property
    def needs_kv_cache(self) -> bool:
        """Full large steps store the cache only when a masked large forward may read it."""
        return self.uses_masked_large


# The paper's operating points (SD3.5 Large + SD3 Medium, 50 steps; Tables 1-3).
PRESETS: dict[str, dict] = {
    "large": dict(method="large", mask_ratios=(), thresholds=()),
    "small": dict(method="small", mask_ratios=(), thresholds=()),
    "t-stitch": dict(method="t-stitch", mask_ratios=(), thresholds=(), tstitch_small_fraction=0.4),
    "srdiffusion": dict(method="srdiffusion", mask_ratios=(), thresholds=(), srdiffusion_threshold=0.005),
    "hybridstitch-10": dict(mask_ratios=(0.1,), thresholds=(0.3, 0.25)),
    "hybridstitch-20": dict(mask_ratios=(0.2,), thresholds=(0.35, 0.25)),
    "hybridstitch-30": dict(mask_ratios=(0.3,), thresholds=(0.5, 0.3)),
    "hybridstitch-40": dict(mask_ratios=(0.4,), thresholds=(0.4, 0.3)),
    "hybridstitch-30-static": dict(mask_ratios=(0.3,), thresholds=(0.5, 0.3), mask_mode="static"),
    "hybridstitch-30-fulllarge": dict(mask_ratios=(0.3,), thresholds=(0.5, 0.3), stage2_large="full"),
    "hybridstitch-20-10": dict(mask_ratios=(0.2, 0.1), thresholds=(0.5, 0.3, 0.2)),
    "hybridstitch-30-10": dict(mask_ratios=(0.3, 0.1), thresholds=(0.5, 0.3, 0.2)),
    "hybridstitch-40-30": dict(mask_ratios=(0.4, 0.3), thresholds=(0.6, 0.5, 0.3)),
}

# The testbed's operating points (hybridstitch/testbed: the trained 32x32 digit pair), calibrated
# at 20 steps, guidance 1.25 by `hybridstitch calibrate --out benchmarks/results/calibration`
# (defaults: 80 samples, seed 0, ratios 0.1-0.4, tau_1 in {0.2, 0.05}, tau_2 in {0.14, 0.1, 0.07,
# 0.045}, SRDiffusion in {0.003, 0.008, 0.015}; 1 CPU thread), 2026-11-26; the table and the
# Pareto fronts are in benchmarks/results/calibration/. The paper's SD3 thresholds fire at once
# on this pair. Rule (hybridstitch.testbed.calibrate.choose_presets): acceptable = prompt accuracy
# at most 2 points below large-only's and distance to large-only (paired classifier features) at
# most half of small-only's; per mask ratio the acceptable config with the lowest modelled latency,
# else the one closest to large-only (testbed-10 and testbed-20: none was acceptable). SRDiffusion
# by the same rule. Static / FullLarge take testbed-30's thresholds; multi-mask r1-r2 takes
# testbed-r1's (tau_1, tau_2) and the next lower swept tau_2 (none: 0.8 tau_2) as tau_3.
PRESETS.update({
    "testbed-10": dict(mask_ratios=(0.1,), thresholds=(0.05, 0.045)),
    "testbed-20": dict(mask_ratios=(0.2,), thresholds=(0.05, 0.045)),
    "testbed-30": dict(mask_ratios=(0.3,), thresholds=(0.05, 0.045)),
    "testbed-40": dict(mask_ratios=(0.4,), thresholds=(0.2, 0.045)),
    "testbed-30-static": dict(mask_ratios=(0.3,), thresholds=(0.05, 0.045), mask_mode="static"),
    "testbed-30-fulllarge": dict(mask_ratios=(0.3,), thresholds=(0.05, 0.045), stage2_large="full"),
    "testbed-20-10": dict(mask_ratios=(0.2, 0.1), thresholds=(0.05, 0.045, 0.036)),
    "testbed-30-10": dict(mask_ratios=(0.3, 0.1), thresholds=(0.05, 0.045, 0.036)),
    "testbed-40-30": dict(mask_ratios=(0.4, 0.3), thresholds=(0.2, 0.045, 0.036)),
    "testbed-srdiffusion": dict(method="srdiffusion", mask_ratios=(), thresholds=(), srdiffusion_threshold=0.003),
})

# Cache freshness and per-sigma thresholds on the testbed (issue 16): testbed-30's thresholds with one
# freshness option each, and testbed-30's 20-step switch points per unit of sigma (d_i / (sigma_{i-1} -
# sigma_i): about 0.05 / 0.02 near step 4 and 0.045 / 0.1 near step 18, rounded). Measured in benchmarks/results/quality.md
# and step_counts.md; the README says which the numbers support.
PRESETS.update({
    "testbed-30-refresh4": dict(mask_ratios=(0.3,), thresholds=(0.05, 0.045), refresh_every=4),
    "testbed-30-refresh2": dict(mask_ratios=(0.3,), thresholds=(0.05, 0.045), refresh_every=2),
    "testbed-30-refreshage": dict(mask_ratios=(0.3,), thresholds=(0.05, 0.045), refresh_age=3.0),
    "testbed-30-share": dict(mask_ratios=(0.3,), thresholds=(0.05, 0.045), refresh_share=0.3),
    "testbed-30-ageweight": dict(mask_ratios=(0.3,), thresholds=(0.05, 0.045), age_weight=0.1),
    "testbed-30-sigma": dict(mask_ratios=(0.3,), thresholds=(2.5, 0.5), difference="sigma"),
    "testbed-30-refresh4-sigma": dict(mask_ratios=(0.3,), thresholds=(2.5, 0.5), refresh_every=4, difference="sigma"),
})
