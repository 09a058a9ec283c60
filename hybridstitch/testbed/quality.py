"""Quality metrics on the testbed, and a plain reference sampler.

All images are testbed images ``[B, 1, 32, 32]`` in ``[-1, 1]``. Feature-space metrics use
the shipped :class:`~hybridstitch.testbed.classifier.DigitClassifier` (its 64-d penultimate
layer) the way FID uses Inception-v3's pool features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch

from hybridstitch.errors import HybridStitchError
from hybridstitch.testbed.classifier import DigitClassifier, load_classifier
from hybridstitch.testbed.data import load_split, prompt_for

# PSNR of identical images would be infinite; each image's MSE is floored so that a
# perfect match scores exactly this (finite means stay finite and comparable).
PSNR_MAX_DB = 100.0
_DATA_RANGE = 2.0  # images span [-1, 1]


def _as_2d_float64(feats, name: str) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().double().numpy()
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise HybridStitchError(f"{name} must be [N, F] with N >= 2 samples, got shape {arr.shape}")
    return arr


def _psd_sqrt(mat: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    eigvals, eigvecs = scipy.linalg.eigh(mat)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, F]`` and ``[M, F]``.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, in float64. The trace
    term is computed as ``tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))``: the same value (the two
    matrices are similar), but the inner matrix is symmetric PSD, so its root comes from
    ``eigh`` with eigenvalues clipped at 0 instead of ``sqrtm`` of the non-symmetric
    product, which turns complex or non-finite when the covariances are near singular
    (fewer samples than features). The result is clipped at 0 against round-off.
    """
    a = _as_2d_float64(feats_a, "feats_a")
    b = _as_2d_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise HybridStitchError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    inner = (inner + inner.T) / 2.0  # symmetric up to round-off; make it exactly so
    tr_covmean = float(np.sqrt(np.clip(scipy.linalg.eigvalsh(inner), 0.0, None)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def _classifier(classifier: DigitClassifier | None) -> DigitClassifier:
    return load_classifier() if classifier is None else classifier


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """Penultimate classifier features ``[B, F]`` (float32, CPU) of images ``[B, 1, 32, 32]``."""
    clf = _classifier(classifier)
    images = images.to(clf.device)
    return torch.cat([clf.features(chunk).float().cpu() for chunk in images.split(512)])


def image_fd(images: torch.Tensor, ref_images: torch.Tensor, classifier: DigitClassifier | None = None) -> float:
    """Frechet distance between two image sets in classifier feature space (the testbed's FID)."""
    return frechet_distance(classifier_features(images, classifier), classifier_features(ref_images, classifier))


@torch.no_grad()
def prompt_accuracy(images: torch.Tensor, labels, classifier: DigitClassifier | None = None) -> float:
    """Fraction of images the classifier reads as the digit they were prompted with."""
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if labels.shape != (images.shape[0],):
        raise HybridStitchError(f"need one label per image: {images.shape[0]} images, labels {tuple(labels.shape)}")
    pred = _classifier(classifier).predict(images).cpu()
    return float((pred == labels).float().mean())


def feature_distance(images: torch.Tensor, ref_images: torch.Tensor, classifier: DigitClassifier | None = None) -> float:
    """Mean L2 distance between paired images' classifier features (a perceptual distance).

    Image ``i`` is compared with ``ref_images[i]``, e.g. an accelerated sample against the
    large model's sample from the same seed; the testbed's stand-in for LPIPS.
    """
    if images.shape != ref_images.shape:
        raise HybridStitchError(f"paired images must have equal shapes: {tuple(images.shape)} vs {tuple(ref_images.shape)}")
    fa = classifier_features(images, classifier)
    fb = classifier_features(ref_images, classifier)
    return float((fa - fb).norm(dim=1).mean())


def psnr(images: torch.Tensor, ref_images: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in ``[-1, 1]`` against paired references.

    A perfect match scores :data:`PSNR_MAX_DB` (100 dB) instead of infinity.
    """
    if images.shape != ref_images.shape:
        raise HybridStitchError(f"paired images must have equal shapes: {tuple(images.shape)} vs {tuple(ref_images.shape)}")
    diff = images.detach().double().cpu() - ref_images.detach().double().cpu()
    mse = diff.pow(2).flatten(1).mean(1)  # [B]
    floor = _DATA_RANGE**2 / 10.0 ** (PSNR_MAX_DB / 10.0)
    db = 10.0 * torch.log10(_DATA_RANGE**2 / mse.clamp_min(floor))
    return float(db.mean())


def real_fd_floor(n: int, seed: int = 0, classifier: DigitClassifier | None = None) -> float:
    """FD between two disjoint random sets of ``n`` real digits: the best a model can score.

    The 1,797 digits (train and held-out together) are shuffled with ``seed``. If
    ``2 * n`` fit, the first ``n`` are compared with the next ``n``; otherwise the shuffle
    is cut into two disjoint halves and ``n`` images are drawn with replacement from each
    (no image is in both sets, but a set may repeat images, which slightly raises the
    floor). FD is biased upward at small ``n`` and is noisy (at ``n = 300`` the floor moves
    between about 70 and 135 with the seed), so compare FDs measured with the same sample
    sizes: this floor is for two sets of ``n``; a model's ``n`` samples scored against the
    297 held-out digits compare with ``n`` real train digits scored against them (the
    training record lists both).
    """
    if n < 2:
        raise HybridStitchError(f"real_fd_floor needs n >= 2, got {n}")
    images, _ = load_split("all")
    total = images.shape[0]
    rng = np.random.RandomState(seed)
    order = rng.permutation(total)
    if 2 * n <= total:
        idx_a, idx_b = order[:n], order[n : 2 * n]
    else:
        half = total // 2
        idx_a = rng.choice(order[:half], size=n, replace=True)
        idx_b = rng.choice(order[half:], size=n, replace=True)
    return image_fd(images[torch.from_numpy(idx_a)], images[torch.from_numpy(idx_b)], classifier)


@torch.no_grad()
def sample_euler(
    transformer,
    prompt_encoder,
    labels: Sequence[int] | torch.Tensor,
    steps: int = 20,
    guidance_scale: float = 2.0,
    generator: torch.Generator | None = None,
    shift: float = 3.0,
    batch_size: int = 128,
) -> torch.Tensor:
    """Plain SD3-style sampling: FlowMatchEulerDiscrete (shift 3.0) with classifier-free guidance.

    The reference the stitched pipeline is measured against. The initial noise is drawn
    for all ``labels`` at once from ``generator`` (``[B, C, H, W]``, as diffusers'
    ``randn_tensor`` on CPU), then denoised in chunks of ``batch_size``. Under CFG the
    batch is ``torch.cat([negative, positive])`` as in diffusers' SD3 pipeline, the
    negative being the null prompt ``""``; ``guidance_scale <= 1`` runs the conditional
    half only. Returns images ``[B, C, H, W]`` clamped to ``[-1, 1]`` (the identity VAE).
    """
    from hybridstitch.scheduling import SD3_SCHEDULER_CONFIG, sd3_scheduler

    labels = [int(x) for x in torch.as_tensor(labels).flatten().tolist()]
    cfg = transformer.config
    device, dtype = transformer.device, transformer.dtype
    size = cfg.sample_size
    noise = torch.randn((len(labels), cfg.in_channels, size, size), generator=generator)  # [B, C, H, W]
    use_cfg = guidance_scale > 1.0
    out = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        latents = noise[start : start + len(chunk)].to(device=device, dtype=torch.float32)
        embeds, pooled = prompt_encoder.encode([prompt_for(c) for c in chunk])  # [b, T, D], [b, P]
        if use_cfg:
            neg_embeds, neg_pooled = prompt_encoder.encode([""] * len(chunk))
            embeds = torch.cat([neg_embeds, embeds])  # [2b, T, D]
            pooled = torch.cat([neg_pooled, pooled])  # [2b, P]
        embeds, pooled = embeds.to(device, dtype), pooled.to(device, dtype)
        scheduler = sd3_scheduler({**SD3_SCHEDULER_CONFIG, "shift": shift})
        scheduler.set_timesteps(steps, device=device)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            v = transformer(
                hidden_states=model_in.to(dtype),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=t.expand(model_in.shape[0]),
                return_dict=False,
            )[0].float()
            if use_cfg:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        out.append(latents.clamp(-1.0, 1.0).cpu())
    return torch.cat(out)


def evaluate_samples(images: torch.Tensor, labels, ref_images: torch.Tensor, classifier: DigitClassifier | None = None) -> dict:
    """FD against ``ref_images`` and prompt accuracy, as a dict of floats."""
    return {
        "fd": image_fd(images, ref_images, classifier),
        "accuracy": prompt_accuracy(images, labels, classifier),
    }


__all__ = [
    "PSNR_MAX_DB",
    "classifier_features",
    "evaluate_samples",
    "feature_distance",
    "frechet_distance",
    "image_fd",
    "prompt_accuracy",
    "psnr",
    "real_fd_floor",
    "sample_euler",
]
