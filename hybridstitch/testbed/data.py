"""The testbed's data: scikit-learn's 8x8 handwritten digits at 32x32.

Pixel space stands in for the VAE latent: an image is a ``[1, 32, 32]`` tensor in
``[-1, 1]`` and the testbed's VAE is the identity. Everything in the testbed (training,
the classifier, the quality metrics) uses the one fixed split below, so numbers measured
on the held-out set never saw a training image.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
CHANNELS = 1
NUM_CLASSES = 10
SPLIT_SEED = 0
NUM_TRAIN = 1500  # the remaining 297 of the 1,797 digits are held out

PROMPT_TEMPLATE = "a handwritten {}"


def prompt_for(label: int) -> str:
    """The canonical prompt of a digit class, e.g. ``"a handwritten 3"``."""
    return PROMPT_TEMPLATE.format(int(label))


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn; no download

    digits = load_digits()
    raw = torch.from_numpy(digits.images.astype(np.float32))  # [1797, 8, 8], values 0..16
    # Bilinear keeps the upsampled values inside the original range (bicubic overshoots).
    images = F.interpolate(
        raw[:, None] / 16.0, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )  # [1797, 1, 32, 32] in [0, 1]
    images = images * 2.0 - 1.0
    labels = torch.from_numpy(digits.target.astype(np.int64))  # [1797]
    return images, labels


def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    n = _all_digits()[0].shape[0]
    order = np.random.RandomState(SPLIT_SEED).permutation(n)
    return np.sort(order[:NUM_TRAIN]), np.sort(order[NUM_TRAIN:])


def load_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 32, 32]`` (float32, in [-1, 1]) and labels ``[N]`` (int64, 0..9).

    ``split`` is ``"train"`` (1,500 images), ``"heldout"`` (297) or ``"all"`` (1,797). The
    split is fixed (seed ``SPLIT_SEED``) and the same for every caller. Copies are returned,
    so callers may modify them.
    """
    images, labels = _all_digits()
    if split == "all":
        return images.clone(), labels.clone()
    train_idx, heldout_idx = _split_indices()
    if split == "train":
        idx = train_idx
    elif split == "heldout":
        idx = heldout_idx
    else:
        from hybridstitch.errors import HybridStitchError

        raise HybridStitchError(f"unknown split {split!r}; use 'train', 'heldout' or 'all'")
    idx_t = torch.from_numpy(idx)
    return images[idx_t].clone(), labels[idx_t].clone()


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)  # [B, C, H + 2s, W + 2s]
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    out = torch.empty_like(images)
    for i in range(b):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out
