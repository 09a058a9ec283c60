"""The method's step metrics (Eqs. 9-10)."""

from __future__ import annotations

import torch


def predict_x0(latents: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """Clean-image estimate of flow matching, Eq. 10: ``x0 = x_i - sigma_i * v_i`` (float32)."""
    return latents.float() - float(sigma) * velocity.float()


def relative_l1(x0: torch.Tensor, x0_prev: torch.Tensor) -> float:
    """Eq. 9: ``d_i = ||x0_i - x0_{i-1}||_1 / ||x0_{i-1}||_1`` over the whole latent (all samples)."""
    num = (x0.float() - x0_prev.float()).abs().sum()
    den = x0_prev.float().abs().sum().clamp_min(1e-12)
    return float(num / den)
