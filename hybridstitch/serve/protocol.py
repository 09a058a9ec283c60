"""The wire interface of the ``hybridstitch`` model, defined once for the repository, the model
and the client.

Every input is one element per request with Triton's batch dimension in front: a request sends
shape [1, 1], so a plain KServe v2 JSON body works without a client library, and Triton's
dynamic batcher can group requests. Only ``prompt`` and ``seed`` are required; the others fall
back to the server's defaults (``hybridstitch serve --method/--steps/--guidance-scale``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..errors import HybridStitchError
from .runner import GenerationRequest

MODEL_NAME = "hybridstitch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # the KServe v2 name ("BYTES", "INT64", ...); config.pbtxt spells it TYPE_<name>
    dims: tuple[int, ...]  # without the batch dimension; -1 = variable
    optional: bool = False

    @property
    def config_type(self) -> str:
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"


INPUTS = (
    TensorSpec("prompt", "BYTES", (1,)),
    TensorSpec("seed", "INT64", (1,)),
    TensorSpec("negative_prompt", "BYTES", (1,), optional=True),
    TensorSpec("steps", "INT32", (1,), optional=True),
    TensorSpec("guidance_scale", "FP32", (1,), optional=True),
    TensorSpec("method", "BYTES", (1,), optional=True),  # a preset name
)
OUTPUTS = (
    TensorSpec("image", "UINT8", (-1, -1, -1)),  # [H, W, C]: the engines' size, C = 1 (grayscale) or 3
    TensorSpec("trace", "BYTES", (1,)),  # the run's trace as JSON
)
_NUMPY = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "UINT8": np.uint8}


def _one(name: str, array: np.ndarray):
    if array.size != 1:
        raise HybridStitchError(
            f"input {name!r} has shape {list(array.shape)}: send one image per request, shape [1, 1] (Triton batches "
            "concurrent requests itself)"
        )
    return array.reshape(-1)[0]


def _text(name: str, value) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except (TypeError, UnicodeDecodeError):
        raise HybridStitchError(f"input {name!r} must be UTF-8 text") from None


def request_from_inputs(get: Callable[[str], np.ndarray | None], defaults: Mapping[str, object]) -> GenerationRequest:
    """A :class:`GenerationRequest` from a request's named inputs (``get(name)`` is None when the
    request omits an optional input); ``defaults`` fills ``steps``, ``guidance_scale`` and ``method``."""
    fields = dict(defaults)
    for spec in INPUTS:
        array = get(spec.name)
        if array is None:
            if not spec.optional:  # Triton refuses a missing required input first; this guards direct use
                raise HybridStitchError(f"the request has no {spec.name!r} input")
            continue
        value = _one(spec.name, np.asarray(array))
        if spec.datatype == "BYTES":
            fields[spec.name] = _text(spec.name, value)
        elif spec.datatype == "FP32":
            fields[spec.name] = float(value)
        else:
            fields[spec.name] = int(value)
    return GenerationRequest(**fields)


def input_arrays(prompt: str, seed: int, negative_prompt: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, method: str | None = None) -> dict[str, np.ndarray]:
    """A request's inputs as [1, 1] arrays (the client's side); those left None are omitted, so the
    server's defaults apply."""
    values = dict(prompt=prompt, seed=seed, negative_prompt=negative_prompt, steps=steps,
                  guidance_scale=guidance_scale, method=method)
    out = {}
    for spec in INPUTS:
        value = values[spec.name]
        if value is not None:
            out[spec.name] = np.array([[value.encode("utf-8") if isinstance(value, str) else value]],
                                      dtype=_NUMPY[spec.datatype])
    return out


def trace_bytes(trace: dict) -> np.ndarray:
    """The trace output of one request: [1, 1] BYTES holding the JSON."""
    import json

    return np.array([[json.dumps(trace).encode("utf-8")]], dtype=np.object_)
