"""Mask selection: the unstable tokens the large model refines in a masked stage."""

from __future__ import annotations

import math

import torch

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


class MaskSelector:
    """Which tokens a masked step refines, for one request.

    ``dynamic`` (the paper's default): the top-k of the latest token scores. ``static`` (the
    StaticMask ablation): the top-k of the scores frozen on the first masked step; multi-mask
    variants take each stage's top-k from those frozen scores.
    """

    def __init__(self, mode: str, patch: int):
        self.mode, self.patch = mode, patch
        self._latest: tuple[torch.Tensor, torch.Tensor] | None = None  # the latest two x0 estimates
        self.frozen: torch.Tensor | None = None

    def observe(self, x0: torch.Tensor, x0_prev: torch.Tensor) -> None:
        """Keep the step's two estimates; the scores are computed only if a masked step asks for them."""
        self._latest = (x0, x0_prev)

    @property
    def scores(self) -> torch.Tensor | None:
        """[B, N] token instability from the latest two x0 estimates."""
        return None if self._latest is None else token_scores(*self._latest, self.patch)

    def select(self, num_masked: int) -> torch.Tensor:
        """index [B, k] (sorted) for the coming masked step."""
        # the stage policy enters a masked stage only after two x0 estimates, so scores exist
        assert self._latest is not None, "a masked stage needs two earlier x0 estimates"
        if self.mode == "static":
            if self.frozen is None:
                self.frozen = self.scores
            return select_mask(self.frozen, num_masked)
        return select_mask(self.scores, num_masked)
