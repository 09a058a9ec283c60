"""HybridStitch: SD3.5 Large stitched with SD3 Medium per timestep and token region.

    from hybridstitch import HybridStitchPipeline, StitchConfig, HybridStitchError
"""

from .config import PRESETS, StitchConfig
from .errors import HybridStitchError
from .pipeline import HybridStitchOutput, HybridStitchPipeline
from .policy import Stage, StagePolicy
from .trace import StepRecord, Trace

__version__ = "0.1.0"

__all__ = [
    "HybridStitchError",
    "HybridStitchOutput",
    "HybridStitchPipeline",
    "PRESETS",
    "Stage",
    "StagePolicy",
    "StepRecord",
    "StitchConfig",
    "Trace",
]
