"""A small CNN digit classifier: prompt accuracy and the feature space for FD.

It plays the role Inception-v3 plays for FID on real SD3 outputs: trained once on the
testbed's real train split, shipped with the weights, and used frozen by
:mod:`hybridstitch.testbed.quality`. Inputs are testbed images ``[B, 1, 32, 32]`` in
``[-1, 1]``.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hybridstitch.errors import HybridStitchError
from hybridstitch.testbed import CLASSIFIER_DIR


class DigitClassifier(ModelMixin, ConfigMixin):
    """Three conv blocks (32x32 -> 4x4), a ``feature_dim`` embedding, then the logits."""

    @register_to_config
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 64):
        super().__init__()
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, w, 16, 16]
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 2w, 8, 8]
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 2w, 4, 4]
        )
        self.embed = nn.Linear(2 * w * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate layer ``[B, feature_dim]``, taken before its ReLU.

        Before the ReLU no unit is identically zero over a set of images, which keeps
        the covariance matrices used by the Frechet distance full rank.
        """
        h = self.convs(images.to(self.device, self.dtype))
        return self.embed(h.flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.head(F.relu(self.features(images)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted labels ``[B]``."""
        return torch.cat([self(chunk).argmax(-1) for chunk in images.split(batch_size)])


@functools.lru_cache(maxsize=4)
def load_classifier(path: str | None = None) -> DigitClassifier:
    """The shipped classifier (or the one saved at ``path``), in eval mode, frozen.

    Cached: repeated calls return the same module, so do not modify it.
    """
    path = path or CLASSIFIER_DIR
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise HybridStitchError(
            f"no digit classifier at {path}; train one with "
            "`python -m hybridstitch.testbed.train --classifier-only --out DIR`"
        )
    model = DigitClassifier.from_pretrained(path).eval()
    model.requires_grad_(False)
    return model
