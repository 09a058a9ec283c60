"""The method's step metrics (Eqs. 9-10)."""

from __future__ import annotations

import torch


def predict_x0(latents: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """Clean-image estimate of flow matching, Eq. 10: ``x0 = x_i - sigma_i * v_i`` (float32)."""
    return latents.float() - float(sigma) * velocity.float()


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """[S, ...] -> [S]: each row's sum, the same at any S. Summed along the last axis first (many
    short sums, each made whole by one thread) and then over a row's few partial sums (too short
    to split across threads): a one-step reduction of each row may be split across threads when
    there is a single row and not when there are several, which changes its last bits."""
    if x.dim() < 3:  # [S] or [S, n]: rows of one run of numbers
        x = x.reshape(x.shape[0] if x.dim() == 2 else 1, 1, -1)
    return x.sum(-1).flatten(1).sum(1)


def relative_l1(x0: torch.Tensor, x0_prev: torch.Tensor) -> float:
    """Eq. 9 for one sample: ``d_i = ||x0_i - x0_{i-1}||_1 / ||x0_{i-1}||_1`` over its latent [1, C, h, w]."""
    if x0.dim() < 2:
        x0, x0_prev = x0.reshape(1, -1), x0_prev.reshape(1, -1)
    return relative_l1_rows(x0, x0_prev)[0]


def relative_l1_rows(x0: torch.Tensor, x0_prev: torch.Tensor) -> list[float]:
    """Eq. 9 per sample of ``[S, C, h, w]`` estimates: S numbers, each the one the sample gets alone."""
    prev = x0_prev.float()
    num = row_sums((x0.float() - prev).abs())
    den = row_sums(prev.abs()).clamp_min(1e-12)
    return (num / den).tolist()
