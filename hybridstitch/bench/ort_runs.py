"""ONNX Runtime's own session runs, counted and timed from outside, and the testbed engines the
runtime benchmarks share.

``OrtRuns`` patches ``InferenceSession.run`` and ``run_with_iobinding`` on the class, so it sees
every engine call of any version of this package (benchmarks/overhead.py compares two checkouts
with it): what is outside those runs is the runtime's own overhead.
"""

from __future__ import annotations

import os
import time


class OrtRuns:
    """Calls into ONNX Runtime's session runs and the seconds inside them, since the last
    :meth:`reset`. One per process: each instance wraps the class's methods once more."""

    def __init__(self):
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        self.reset()
        for name in ("run", "run_with_iobinding"):
            original = getattr(InferenceSession, name)

            def timed(*args, _original=original, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.calls += 1
                    self.seconds += time.perf_counter() - t0

            setattr(InferenceSession, name, timed)

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


def export_testbed_engines(folder: str) -> str:
    """The shipped testbed pair as ONNX Runtime engines at 32x32, up to batch 8, the paper's buckets:
    the engine set of the runtime benchmarks (overhead, scheduler, stage 2). Returns ``folder``."""
    from hybridstitch.export import ExportRequest, export_engines
    from hybridstitch.testbed import LARGE_DIR, SMALL_DIR

    export_engines(ExportRequest(large=LARGE_DIR, small=SMALL_DIR, height=32, width=32, batch=8,
                                 buckets=(0.1, 0.2, 0.3, 0.4)), os.fspath(folder), progress=False)
    return folder
