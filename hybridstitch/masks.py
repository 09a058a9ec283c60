"""Mask selection: the unstable tokens the large model refines in a masked stage."""

from __future__ import annotations

import math

import torch

from .policy import Stage
from .tokens import patchify


def tokens_for_ratio(ratio: float, num_tokens: int) -> int:
    """``ceil(r * N)`` masked tokens, at least 1 and at most N.

    A tiny epsilon keeps float noise (0.3 * 10 = 3.0000000000000004) from adding a token.
    """
    return max(1, min(num_tokens, math.ceil(ratio * num_tokens - 1e-9)))


def token_scores(x0: torch.Tensor, x0_prev: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-token instability: sum over the token's patch pixels and channels of |x0_i - x0_{i-1}|.

    x0, x0_prev [B, C, H, W] -> [B, N] (float32).
    """
    diff = (x0.float() - x0_prev.float()).abs()
    return patchify(diff, patch).sum(dim=-1)


def select_mask(scores: torch.Tensor, num_masked: int) -> torch.Tensor:
    """The ``num_masked`` highest-scoring tokens per sample, as sorted positions.

    scores [B, N] -> index [B, k] (int64, ascending, so gathers and cache writes walk memory in order).
    """
    top = torch.topk(scores, num_masked, dim=1, largest=True, sorted=False).indices
    return torch.sort(top, dim=1).values


def oldest_first(ages: torch.Tensor, exclude: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` oldest cache entries per sample outside ``exclude``, oldest first, ties to the lowest
    position (so equal ages are refreshed in reading order: a round robin over the image).

    ages [B, N] int64, exclude [B, j] -> index [B, count].
    """
    b, n = ages.shape
    positions = torch.arange(n, device=ages.device)
    key = ages * n + (n - 1 - positions)  # [B, N]: age first, then the lower position; all distinct
    key = key.scatter(1, exclude, -1)  # never pick an excluded token again
    return torch.topk(key, count, dim=1, largest=True, sorted=False).indices


class MaskSelector:
    """Which tokens a masked step refines, and how old the large model's KV cache is, for one sample.

    ``dynamic`` (the paper's default): the top-k of the latest token scores. ``static`` (the
    StaticMask ablation): the top-k of the scores frozen on the first masked step; multi-mask
    variants take each stage's top-k from those frozen scores.

    Cache age: ``age_j`` at step ``i`` is ``i`` minus the step at which the large model last
    computed token ``j``'s K/V (a full large step computes every token, a masked step its masked
    tokens); an entry written at step ``i - 1`` is 1 step old. The freshness options of
    :class:`~hybridstitch.config.StitchConfig` read it: ``refresh_share`` and ``age_weight`` in
    :meth:`select`, ``refresh_every`` and ``refresh_age`` in :meth:`plan`.
    """

    def __init__(self, mode: str, patch: int, refresh_share: float = 0.0, age_weight: float = 0.0,
                 refresh_every: int = 0, refresh_age: float = 0.0):
        self.mode, self.patch = mode, patch
        self.refresh_share, self.age_weight = refresh_share, age_weight
        self.refresh_every, self.refresh_age = refresh_every, refresh_age
        self._latest: tuple[torch.Tensor, torch.Tensor] | None = None  # the latest two x0 estimates
        self.frozen: torch.Tensor | None = None
        self.step = -1  # the step being planned
        self.full_at: int | None = None  # the last full large step (every cache row written then)
        self.computed_at: torch.Tensor | None = None  # [B, N] int64, the step of each row's K/V; None: all full_at
        self.masked_since_full = 0
        self.refreshes: list[int] = []  # masked steps run as full large steps

    @classmethod
    def for_config(cls, config, patch: int) -> "MaskSelector":
        """The selector a :class:`~hybridstitch.config.StitchConfig` asks for."""
        return cls(config.mask_mode, patch, config.refresh_share, config.age_weight, config.refresh_every,
                   config.refresh_age)

    def observe(self, x0: torch.Tensor, x0_prev: torch.Tensor) -> None:
        """Keep the step's two estimates; the scores are computed only if a masked step asks for them."""
        self._latest = (x0, x0_prev)

    @property
    def scores(self) -> torch.Tensor | None:
        """[B, N] token instability from the latest two x0 estimates."""
        return None if self._latest is None else token_scores(*self._latest, self.patch)

    def ages(self, shape: tuple[int, int] | None = None) -> torch.Tensor | None:
        """[B, N] int64: each cache entry's age at the step being planned (None before any full large step).
        ``shape``: [B, N] while every entry dates from the last full step (default: one sample's tokens)."""
        if self.full_at is None:
            return None
        if self.computed_at is None:
            return torch.full(shape or (1, self._num_tokens()), self.step - self.full_at, dtype=torch.int64)
        return self.step - self.computed_at

    def mean_age(self) -> float | None:
        """The mean cache age over the image tokens at the step being planned."""
        if self.full_at is None:
            return None
        return float(self.step - self.full_at) if self.computed_at is None else float(self.ages().float().mean())

    def _num_tokens(self) -> int:
        assert self._latest is not None, "the token count comes from the x0 estimates"
        h, w = self._latest[0].shape[-2:]
        return (h // self.patch) * (w // self.patch)

    def plan(self, stage, step: int):
        """The stage to run at ``step``: the policy's ``stage``, or, when ``refresh_every`` /
        ``refresh_age`` say the cache is due, a full large step in its place (same stage index,
        kind ``large``: the whole cache is rewritten). Call once per step, before :meth:`select`."""
        self.step = step
        if stage.kind == "masked" and self.full_at is not None and self._refresh_due():
            stage = Stage(stage.index, "large")
            self.refreshes.append(step)
        if stage.kind == "large":
            self.full_at, self.computed_at, self.masked_since_full = step, None, 0
        return stage

    def _refresh_due(self) -> bool:
        if self.refresh_every and self.masked_since_full >= self.refresh_every:
            return True
        return bool(self.refresh_age) and self.mean_age() > self.refresh_age

    def select(self, num_masked: int) -> torch.Tensor:
        """index [B, k] (sorted) for the coming masked step; the cache ages count it as computed."""
        # the stage policy enters a masked stage only after two x0 estimates, so scores exist
        assert self._latest is not None, "a masked stage needs two earlier x0 estimates"
        if self.mode == "static":
            if self.frozen is None:
                self.frozen = self.scores
            scores = self.frozen
        else:
            scores = self.scores
        ages = self.ages(tuple(scores.shape))
        if ages is None:  # no full large step has written the cache (a replayed schedule): rank by scores alone
            index = select_mask(scores, num_masked)
        else:
            if self.age_weight:
                scores = scores / scores.mean(dim=1, keepdim=True).clamp_min(1e-12) + self.age_weight * ages
            n_old = int(round(self.refresh_share * num_masked))
            top = torch.topk(scores, num_masked - n_old, dim=1, largest=True, sorted=False).indices
            if n_old:
                top = torch.cat([top, oldest_first(ages, top, n_old)], dim=1)
            index = torch.sort(top, dim=1).values
            written = ages.new_full(index.shape, self.step)
            self.computed_at = (self.step - ages).scatter(1, index, written)  # [B, N]
            self.masked_since_full += 1
        return index
