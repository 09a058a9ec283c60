"""The paper's latency model (Eqs. 3-8) and the mask-ratio bound, over measured per-call latencies.

With ``T`` steps, switch steps ``s_1 < ... < s_{n+1}`` and mask ratios ``r_1 .. r_n``
(DESIGN.md section 2)::

    L_large = t_l * (s_1 + sum_i t_l(r_i) / t_l * (s_{i+1} - s_i))
    L_small = t_s * (T - s_1)
    L       = L_large + L_small,        speed-up = T * t_l / L

``t_l`` and ``t_s`` are one call of the large and the small model over all tokens, ``t_l(r)``
one masked large call at ratio ``r``, measured per bucket (not ``r * t_l``: the text tokens,
the patch embedding and the cache writes do not shrink with ``r``). A masked stage beats the
large model only if ``t_l(r) + t_s < t_l``.

The baselines fit the same formula with no masked stage (SRDiffusion: large then small;
T-Stitch: small then large), so :func:`predict_from_trace` counts the steps of each stage kind
rather than assuming an order. Pure Python: no backend is imported.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import HybridStitchError


class LatencyBoundWarning(UserWarning):
    """A masked stage is slower than the large model alone on the current engines."""


def ratio_key(r: float) -> float:
    """Ratios as dict keys: 0.1 + 0.2 and 0.3 must meet."""
    return round(float(r), 6)


@dataclass(frozen=True)
class CallLatencies:
    """Seconds per model call: ``large`` (t_l), ``small`` (t_s), ``masked`` (t_l(r) per bucket ratio)."""

    large: float | None
    small: float | None
    masked: Mapping[float, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "masked", {ratio_key(r): float(t) for r, t in dict(self.masked).items()})

    def masked_at(self, ratio: float) -> float:
        key = ratio_key(ratio)
        if key not in self.masked:
            measured = ", ".join(f"{r:g}" for r in sorted(self.masked)) or "none"
            raise HybridStitchError(
                f"no measured masked-call latency t_l(r) for r = {ratio:g} (measured: {measured}); "
                "time a masked forward at that ratio (bucket) first"
            )
        return self.masked[key]

    @classmethod
    def from_dict(cls, per_call_seconds: Mapping) -> "CallLatencies":
        """``{"large": t_l, "small": t_s, "large_masked": {r: t_l(r)}}``; ``large_masked`` may be absent."""
        masked = per_call_seconds.get("large_masked") or {}
        if not isinstance(masked, Mapping):
            raise HybridStitchError("per_call_seconds['large_masked'] must map mask ratio -> seconds, e.g. {0.3: 0.021}")
        return cls(per_call_seconds.get("large"), per_call_seconds.get("small"), masked)

    def to_dict(self) -> dict:
        return {"large": self.large, "small": self.small, "large_masked": {str(r): t for r, t in sorted(self.masked.items())}}


@dataclass(frozen=True)
class LatencyPrediction:
    """Eqs. 3-8 for one run: seconds in large-model calls, in small-model calls, and their sum."""

    num_steps: int
    large_seconds: float  # L_large
    small_seconds: float  # L_small
    large_only_seconds: float  # T * t_l

    @property
    def total_seconds(self) -> float:
        return self.large_seconds + self.small_seconds

    @property
    def speedup(self) -> float:
        return self.large_only_seconds / self.total_seconds if self.total_seconds > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "large_seconds": self.large_seconds,
            "small_seconds": self.small_seconds,
            "total_seconds": self.total_seconds,
            "large_only_seconds": self.large_only_seconds,
            "speedup": self.speedup,
        }


def _require(value: float | None, what: str) -> float:
    if value is None:
        raise HybridStitchError(f"the latency model needs {what}, which was not measured")
    return float(value)


def predict_from_counts(
    num_large: int,
    masked_counts: Mapping[float, int],
    num_small: int,
    latencies: CallLatencies,
    masked_runs_full_large: bool = False,
) -> LatencyPrediction:
    """The model over step counts: ``num_large`` large-only steps, ``masked_counts[r]`` masked steps
    at ratio ``r`` (small + masked large), ``num_small`` small-only steps.

    ``masked_runs_full_large``: the FullLarge ablation, whose masked steps run the whole large
    model (t_l in place of t_l(r)).
    """
    if num_large < 0 or num_small < 0 or any(c < 0 for c in masked_counts.values()):
        raise HybridStitchError("step counts must be >= 0")
    num_masked = sum(masked_counts.values())
    steps = num_large + num_masked + num_small
    t_l = _require(latencies.large, "t_l (a full large call)")
    large = t_l * num_large
    for r, count in masked_counts.items():
        if count:
            large += (t_l if masked_runs_full_large else latencies.masked_at(r)) * count
    small = _require(latencies.small, "t_s (a small call)") * (num_masked + num_small) if num_masked + num_small else 0.0
    return LatencyPrediction(steps, large, small, t_l * steps)


def predict(
    num_steps: int,
    switch_steps: Sequence[int],
    mask_ratios: Sequence[float],
    t_l: float,
    t_s: float,
    t_l_r: Mapping[float, float] | None = None,
) -> LatencyPrediction:
    """Eqs. 3-8 as written: large until ``s_1``, masked at ``r_i`` over ``[s_i, s_{i+1})``, small after.

    ``switch_steps`` has ``len(mask_ratios) + 1`` entries (0-based first step of each later
    stage); a run that never reached the later stages may give fewer, the missing ones count
    as ``T``. Large only: ``switch_steps=[T]``; SRDiffusion: ``[s]``; small only: ``[0]``.
    """
    n = len(mask_ratios)
    s = [int(x) for x in switch_steps]
    if len(s) > n + 1:
        raise HybridStitchError(f"{n} mask ratio(s) take at most {n + 1} switch steps, got {s}")
    if not s:
        s = [num_steps]
    s = s + [num_steps] * (n + 1 - len(s))
    if any(x < 0 or x > num_steps for x in s) or any(a > b for a, b in zip(s, s[1:])):
        raise HybridStitchError(f"switch steps must be non-decreasing and within 0..{num_steps}, got {list(switch_steps)}")
    counts: dict[float, int] = {}
    for i, r in enumerate(mask_ratios):
        counts[ratio_key(r)] = counts.get(ratio_key(r), 0) + s[i + 1] - s[i]
    latencies = CallLatencies(t_l, t_s, t_l_r or {})
    return predict_from_counts(s[0], counts, num_steps - s[-1], latencies)


def stage_counts_from_trace(trace, by: str = "bucket") -> tuple[int, dict[float, int], int]:
    """``(large steps, {ratio: masked steps}, small-only steps)`` of a pipeline :class:`~hybridstitch.trace.Trace`.

    ``by="bucket"`` keys masked steps by the bucket that served them (engines), ``"mask_ratio"``
    by the configured ratio.
    """
    large = small = 0
    masked: dict[float, int] = {}
    for rec in trace.steps:
        if rec.stage_kind == "large":
            large += 1
        elif rec.stage_kind == "small":
            small += 1
        else:
            r = ratio_key(_step_ratio(rec, by))
            masked[r] = masked.get(r, 0) + 1
    return large, masked, small


def _step_ratio(rec, by: str) -> float:
    if by == "bucket" and rec.bucket_ratio is not None:
        return rec.bucket_ratio
    return rec.mask_ratio


def predict_from_trace(trace, latencies: CallLatencies, by: str = "bucket") -> LatencyPrediction:
    """The model for the stages a run actually went through (any order: T-Stitch runs small first)."""
    large, masked, small = stage_counts_from_trace(trace, by)
    full = (trace.config or {}).get("stage2_large") == "full"
    return predict_from_counts(large, masked, small, latencies, masked_runs_full_large=full)


def per_call_samples(traces: Iterable, by: str = "bucket") -> dict:
    """Every call's seconds from traces: ``{"large": [...], "small": [...], "large_masked": {r: [...]}}``.

    ``large`` counts full large calls (large steps, and the masked steps of FullLarge), ``small``
    every small call.
    """
    out: dict = {"large": [], "small": [], "large_masked": {}}
    for trace in traces:
        for rec in trace.steps:
            if "large" in rec.seconds:
                out["large"].append(rec.seconds["large"])
            if "small" in rec.seconds:
                out["small"].append(rec.seconds["small"])
            if "large_masked" in rec.seconds:
                r = ratio_key(_step_ratio(rec, by))
                out["large_masked"].setdefault(r, []).append(rec.seconds["large_masked"])
    return out


def per_call_medians(traces, by: str = "bucket") -> CallLatencies:
    """Median seconds per call over one trace or several (pooled)."""
    if hasattr(traces, "steps"):
        traces = [traces]
    samples = per_call_samples(traces, by)
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return CallLatencies(
        med(samples["large"]), med(samples["small"]), {r: statistics.median(v) for r, v in samples["large_masked"].items()}
    )


def mask_ratio_bound(t_l: float, t_s: float, t_l_r: float) -> bool:
    """Stage 2 beats the large model alone: ``t_l(r) + t_s < t_l``."""
    return t_l_r + t_s < t_l


def break_even_ratio(t_l: float, t_s: float) -> float:
    """The paper's estimate of the largest useful mask ratio, ``1 - t_s / t_l`` (assumes t_l(r) ~ r t_l)."""
    return 1.0 - t_s / t_l


def check_latency_bound(config, per_call_seconds: Mapping | CallLatencies) -> list[str]:
    """One message per mask ratio of ``config`` whose measured latencies violate ``t_l(r) + t_s < t_l``.

    ``per_call_seconds``: a :class:`CallLatencies` or ``{"large": t_l, "small": t_s,
    "large_masked": {r: t_l(r)}}``, keyed by the config's ratios. Ratios without a measurement are
    skipped; configs without a masked large stage (baselines, and the FullLarge ablation, slower
    than large by construction) give no message.
    """
    lat = per_call_seconds if isinstance(per_call_seconds, CallLatencies) else CallLatencies.from_dict(per_call_seconds)
    if not config.uses_masked_large or lat.large is None or lat.small is None:
        return []
    messages = []
    for r in config.mask_ratios:
        t_lr = lat.masked.get(ratio_key(r))
        if t_lr is None or mask_ratio_bound(lat.large, lat.small, t_lr):
            continue
        limit = break_even_ratio(lat.large, lat.small)
        hint = (f"use a mask ratio below about {limit:.0%}" if limit >= 0.01
                else "the small model is hardly faster than the large one here, so no mask ratio pays off")
        messages.append(
            f"{config.name}: at mask ratio {r:g} a masked step costs t_l(r) + t_s = {t_lr * 1e3:.3g} + {lat.small * 1e3:.3g} ms "
            f">= t_l = {lat.large * 1e3:.3g} ms, so it is slower than running the large model alone on these engines: "
            f"{hint}"
        )
    return messages


def warn_if_bound_violated(config, trace, warned: set, stacklevel: int = 4) -> None:
    """Warn (once per config in ``warned``) when ``trace``'s own median call times violate the bound."""
    if config in warned or not trace.stage_counts.get("masked"):
        return
    messages = check_latency_bound(config, per_call_medians(trace, by="mask_ratio"))
    if messages:
        warned.add(config)
        # stacklevel: this function, the pipeline's frames (the caller says how many), the caller
        warnings.warn("; ".join(messages), LatencyBoundWarning, stacklevel=stacklevel)


__all__ = [
    "CallLatencies",
    "LatencyBoundWarning",
    "LatencyPrediction",
    "break_even_ratio",
    "check_latency_bound",
    "mask_ratio_bound",
    "per_call_medians",
    "per_call_samples",
    "predict",
    "predict_from_counts",
    "predict_from_trace",
    "stage_counts_from_trace",
    "warn_if_bound_violated",
]
