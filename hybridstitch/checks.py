"""Checks of the values a user passes: type, range and finiteness.

Each check returns the value in its plain form (a Python ``int``, ``float``, ``list[str]``) or
raises :class:`~hybridstitch.errors.HybridStitchError` with what to pass instead, so the pipeline
refuses a bad request before any work and the loop never meets a value it cannot use. Pure: no
model, no file, nothing of the package but the error type (the loop may call
:func:`check_finite` from any module).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import torch

from .errors import HybridStitchError


def _kind(value: Any) -> str:
    return type(value).__name__


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python or NumPy, not a bool) within [minimum, maximum]."""
    # bool is an int subclass: steps=True would silently mean one step.
    if isinstance(value, bool):
        raise HybridStitchError(f"{name} must be an integer, got the bool {value!r}")
    try:
        v = operator.index(value)  # int, numpy integers, integer 0-d tensors; not floats or strings
    except TypeError:
        raise HybridStitchError(f"{name} must be an integer, got {value!r} ({_kind(value)})") from None
    if minimum is not None and v < minimum or maximum is not None and v > maximum:
        span = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise HybridStitchError(f"{name} must be an integer {span}, got {v}")
    return v


def real(name: str, value: Any) -> float:
    """A finite real number (int, float or a NumPy scalar; not a bool, string or tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HybridStitchError(f"{name} must be a real number, got {value!r} ({_kind(value)})")
    v = float(value)
    if not math.isfinite(v):
        # inf guidance gives NaN latents (a black image); NaN compares false and turns guidance off.
        raise HybridStitchError(f"{name} must be a finite number, got {v}")
    return v


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise HybridStitchError(f"{name} must be True or False, got {value!r} ({_kind(value)})")
    return value


def tensor(name: str, value: Any, ndim: int | None = None) -> torch.Tensor:
    """A floating-point torch tensor holding finite values only."""
    if type(value).__module__ == "numpy":
        raise HybridStitchError(f"{name} is a NumPy array; pass a torch tensor (torch.from_numpy({name}))")
    if not isinstance(value, torch.Tensor):
        raise HybridStitchError(f"{name} must be a torch tensor, got {_kind(value)}")
    if not value.is_floating_point():
        raise HybridStitchError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise HybridStitchError(f"{name} must have {ndim} dimensions, got shape {list(value.shape)}")
    bad = int((~torch.isfinite(value)).sum()) if value.numel() else 0
    if bad:
        raise HybridStitchError(
            f"{name} holds {bad} NaN or infinite value(s) of {value.numel()}; they would turn the whole image into NaN. "
            "Pass finite values"
        )
    return value


def prompts(name: str, value: Any) -> list[str]:
    """A prompt or a non-empty list of prompts, as a list."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise HybridStitchError(f"{name} must be a string or a list of strings, got {_kind(value)}")
    if not value:
        raise HybridStitchError(f"{name} is an empty list; pass at least one prompt")
    for i, p in enumerate(value):
        if not isinstance(p, str):
            raise HybridStitchError(f"{name}[{i}] must be a string, got {p!r} ({_kind(p)})")
    return list(value)


def generators(generator: Any, batch: int) -> torch.Generator | list[torch.Generator] | None:
    """None, one ``torch.Generator``, or one per image (``batch`` of them, all on one device)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise HybridStitchError(
                f"got {len(generator)} generators for {batch} image(s); pass one generator, or one per image "
                "(prompts x num_images_per_prompt)"
            )
        for i, g in enumerate(generator):
            if not isinstance(g, torch.Generator):
                raise HybridStitchError(f"generator[{i}] must be a torch.Generator, got {_kind(g)}")
        if len({g.device.type for g in generator}) > 1:
            raise HybridStitchError("the generators are on different devices; create them all on one device")
        return list(generator)
    raise HybridStitchError(
        f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(42)) or a list of them, "
        f"got {generator!r} ({_kind(generator)})"
    )


def check_finite(latents: torch.Tensor, step: int, stage_kind: str, samples: Sequence[int] | None = None) -> None:
    """Stop a run whose latents ``[B, C, h, w]`` hold NaN or inf after step ``step``.

    Every later step would only carry the NaN to a black image; the error names the step, the
    stage and which samples (rows, or ``samples[row]`` when given) went bad. One reduction
    and one host sync per call.
    """
    finite = torch.isfinite(latents).flatten(1).all(dim=1)  # [B]
    if bool(finite.all()):
        return
    rows = [int(r) for r in (~finite).nonzero().flatten().tolist()]
    which = [samples[r] for r in rows] if samples is not None else rows
    raise HybridStitchError(
        f"the latents became NaN or infinite after step {step} ({stage_kind} stage), sample(s) {which}. Usual causes: "
        "float16 overflow (load in bfloat16 or float32; exported engines: --fp32-blocks auto), a guidance_scale far "
        "too large, or damaged weights"
    )


__all__ = ["check_finite", "flag", "generators", "integer", "prompts", "real", "tensor"]
