"""The per-step record of a run: what ran, why, and how long each model call took."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from .fileio import atomic_write_text


@dataclass
class StepRecord:
    step: int
    timestep: float
    sigma: float
    stage: int  # 1-based stage index (1 = large)
    stage_kind: str  # "large" | "masked" | "small"
    d: float | None  # Eq. 9 difference of this step (None on the first step)
    mask_ratio: float | None = None  # the configured ratio of a masked stage
    bucket_ratio: float | None = None  # the engine bucket that served it (engines only)
    masked_tokens: int = 0  # per sample
    seconds: dict[str, float] = field(default_factory=dict)  # model call -> seconds
    overhead_seconds: float = 0.0  # time in the step outside model calls
    mask_index: list[list[int]] | None = None  # per sample, the masked token positions (record_masks=True)


@dataclass
class Trace:
    """One image's run: its stages, ``d_i``, masks and the engine calls it took part in (a call
    shared with other images counts in full for each)."""

    config: dict
    num_steps: int
    height: int
    width: int
    batch: int  # images in the call this one was part of
    backend: str
    steps: list[StepRecord] = field(default_factory=list)
    switch_steps: list[int] = field(default_factory=list)
    total_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    sample: int = 0  # this image's position in its call

    @property
    def model_seconds(self) -> float:
        return sum(sum(s.seconds.values()) for s in self.steps)

    @property
    def stage_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.steps:
            counts[s.stage_kind] = counts.get(s.stage_kind, 0) + 1
        return counts

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_seconds"] = self.model_seconds
        d["stage_counts"] = self.stage_counts
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json())
