"""Measurement harnesses: the latency benchmark and the pieces every benchmark shares.

Kept out of the method package's core: the method imports nothing from here. One concern per
module:

* :mod:`.timer`: the one interleaved timer (warm-up, repetitions interleaved across the runs
  compared, medians and min-max);
* :mod:`.report`: the one report writer (JSON + Markdown + optional PNG, atomic writes);
* :mod:`.machine`: the one machine description (CPU, cores, threads, versions, GPU);
* :mod:`.replay`: replayed schedules (switch steps given, not decided from ``d_i``);
* :mod:`.synthetic` and :mod:`.testbed`: the two latency workloads; :mod:`.backends`: how a
  workload gets its denoisers on eager / compile / ONNX Runtime / TensorRT;
* :mod:`.latency`: the latency benchmark (``hybridstitch bench``, ``benchmarks/latency.py``),
  :mod:`.latency_render` its Markdown and plot.

The names below are re-exported lazily, so ``import hybridstitch.bench.timer`` costs no
diffusers import.
"""

from __future__ import annotations

import importlib

# public name -> the module (in this package) that defines it
_EXPORTS = {
    "ReplaySwitches": "replay",
    "replay_denoise": "replay",
    "replay_stages": "replay",
    "build_synthetic_transformer": "synthetic",
    "synthetic_shapes": "synthetic",
    "flop_ratios": "synthetic",
    "InterleavedTimer": "timer",
    "summary": "timer",
    "write_report": "report",
    "machine_info": "machine",
    "LatencySettings": "latency",
    "main": "latency",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
