"""SD3's scheduler, made in one place: FlowMatchEulerDiscrete with shift 3.0 unless a checkpoint
or an engine manifest records another configuration.

The scheduler only does the timestep arithmetic (as in diffusers); nothing here touches a model.
"""

from __future__ import annotations

from typing import Any

# SD3 / SD3.5's own scheduler_config.json: 1000 training steps, shift 3.0.
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


def sd3_scheduler(config: dict | None = None):
    """A ``FlowMatchEulerDiscreteScheduler`` from ``config`` (a saved ``scheduler_config.json``'s
    contents; keys starting with ``_`` are diffusers' bookkeeping and ignored), else SD3's default."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not config:
        return FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)
    return FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})


__all__ = ["SD3_SCHEDULER_CONFIG", "sd3_scheduler"]
