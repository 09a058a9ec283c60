"""A small, really trained large/small SD3-transformer pair on 32x32 handwritten digits.

Real SD3 weights cannot be had here, so quality claims are measured on this testbed:
``weights/large`` (an SD3.5-Large-style transformer, the prompt encoder, the identity VAE,
the scheduler) and ``weights/small`` (an SD3-Medium-style transformer sharing the large
one's prompt encoder and VAE), trained by :mod:`hybridstitch.testbed.train`, plus a digit
classifier (``weights/classifier``) for FD and prompt accuracy
(:mod:`hybridstitch.testbed.quality`).
"""

import os

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
LARGE_DIR = os.path.join(WEIGHTS_DIR, "large")
SMALL_DIR = os.path.join(WEIGHTS_DIR, "small")
CLASSIFIER_DIR = os.path.join(WEIGHTS_DIR, "classifier")

__all__ = ["CLASSIFIER_DIR", "LARGE_DIR", "SMALL_DIR", "WEIGHTS_DIR"]
