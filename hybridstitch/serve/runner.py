"""Requests in, images out: the one interface the serving model runs requests through.

The Triton model only calls :meth:`RequestRunner.submit` and :meth:`RequestRunner.close`, so
the runtime behind it can change without touching the server. :class:`BatchingRunner` (what
:func:`open_runner` gives) runs the requests in flight together through the step-level
scheduler: every step, each engine once over every image that needs it, whatever its request's
preset, step count, guidance or arrival time; a request joins or leaves at a step boundary.
:class:`SequentialRunner` (one request at a time, each alone through ``HybridStitchPipeline.__call__``)
stays as the reference the batching one is measured and tested against.
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .. import checks
from ..config import StitchConfig
from ..errors import HybridStitchError
from ..pipeline import DEFAULT_PRESET

MAX_STEPS = 1000  # far above any useful schedule; refuses a request that would hold a worker for hours
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class GenerationRequest:
    """One image. Height and width are the engines' own (a served engine set has one size).

    Checked when made, so a request that exists is one the runner accepts; what only the engines
    know (their buckets, their size) is checked by the pipeline before any work.
    """

    prompt: str
    seed: int
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.0
    method: str = DEFAULT_PRESET

    def __post_init__(self):
        for name in ("prompt", "negative_prompt", "method"):
            if not isinstance(getattr(self, name), str):
                raise HybridStitchError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        # bool is an int subclass: refuse it, True is not a seed or a step count anyone meant
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise HybridStitchError(f"seed must be an integer, got {self.seed!r}")
        if not INT64_MIN <= int(self.seed) <= INT64_MAX:
            raise HybridStitchError(f"seed must fit in 64 bits (from {INT64_MIN} to {INT64_MAX}), got {self.seed}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or not 1 <= self.steps <= MAX_STEPS:
            raise HybridStitchError(f"steps must be an integer from 1 to {MAX_STEPS}, got {self.steps!r}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float, np.floating, np.integer)) \
                or not math.isfinite(self.guidance_scale):
            raise HybridStitchError(f"guidance_scale must be a finite number (1 turns guidance off), got {self.guidance_scale!r}")
        StitchConfig.preset(self.method)  # an unknown name raises, listing the presets


# (image uint8 [H, W, C], the run's trace as a JSON-ready dict)
Result = tuple[np.ndarray, dict]


class RequestRunner(Protocol):
    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        """Queue one request; the future resolves to :data:`Result` or fails with that request's
        own error. Refuses at once (``HybridStitchError``) when the runner is full or closed."""

    def close(self) -> None:
        """Finish the request in progress, fail the queued ones, stop the workers."""


def open_runner(pipe, max_queue: int) -> RequestRunner:
    """The runner the serving model uses (:data:`RUNNER`): step-level batching over every request it holds."""
    return RUNNER(pipe, max_samples=max_queue, max_queue=max_queue)


def check_submit(request, closed: bool, waiting: int, max_queue: int) -> None:
    """The refusals both runners give at ``submit``: not a request, closed, or full."""
    if not isinstance(request, GenerationRequest):
        raise HybridStitchError(f"submit takes a GenerationRequest, got {type(request).__name__}")
    if closed:
        raise HybridStitchError("the runner is closed (the server is shutting down); send the request again later")
    if waiting >= max_queue:
        raise HybridStitchError(
            f"the server is busy: {max_queue} requests are already waiting; retry later, or start the "
            "server with a larger --max-batch-size"
        )


def image_array(image) -> np.ndarray:
    """A PIL image as uint8 [H, W, C] (C = 1 for grayscale, so every image has three axes)."""
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def call_arguments(request: GenerationRequest) -> dict:
    """The pipeline arguments of one request: the same for a direct call and the scheduler."""
    import torch

    return dict(
        prompt=[request.prompt],
        negative_prompt=[request.negative_prompt],
        config=request.method,
        num_inference_steps=int(request.steps),
        guidance_scale=float(request.guidance_scale),
        generator=torch.Generator().manual_seed(int(request.seed)),
        output_type="pil",
        progress=False,
    )


def result_of(out) -> Result:
    return image_array(out.images[0]), out.trace.to_dict()


def generate_one(pipe, request: GenerationRequest) -> Result:
    """One request alone through the pipeline: what a direct call with these arguments returns."""
    return result_of(pipe(**call_arguments(request)))


class SequentialRunner:
    """The stand-in: one worker thread runs the queued requests one at a time, each alone.

    ``max_queue`` bounds the requests waiting (not counting the one running); a full queue
    refuses at :meth:`submit`, so memory stays bounded however fast requests arrive.
    """

    def __init__(self, pipe, max_queue: int = 16):
        self._pipe = pipe
        self._max_queue = max_queue = checks.integer("max_queue", max_queue, 1)
        self._queue: queue.Queue = queue.Queue()  # bounded by check_submit, under the lock
        self._lock = threading.Lock()  # orders submit against close: nothing is queued after close
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="hybridstitch-runner", daemon=True)
        self._worker.start()

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            check_submit(request, self._closed, self._queue.qsize(), self._max_queue)
            self._queue.put_nowait((request, future))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = generate_one(self._pipe, request)
            except Exception as e:  # noqa: BLE001 - any failure belongs to this request alone; the worker goes on
                future.set_exception(e)
            else:
                future.set_result(result)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        while True:  # fail what is still waiting, then wake the worker
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(HybridStitchError("the server shut down before this request ran; send it again"))
        self._queue.put(None)
        self._worker.join()


class BatchingRunner:
    """Step-level batching: the requests it holds run together, one step at a time.

    A :class:`~hybridstitch.scheduler.StepScheduler` on its own thread.
    At most ``max_samples`` images run together (each request is one image); ``max_queue``
    bounds the requests waiting beyond them, and a full queue refuses at :meth:`submit`. A
    request's image and trace are those of a direct call with its arguments (stages, masks and
    caches are per image). A request the pipeline refuses when preparing it (a prompt the
    encoder does not know, a size the engines lack) fails its own future; the others go on.
    """

    def __init__(self, pipe, max_samples: int = 4, max_queue: int = 16):
        from ..scheduler import StepScheduler

        self._pipe = pipe
        self._max_queue = max_queue = checks.integer("max_queue", max_queue, 1)
        self._scheduler = StepScheduler(pipe, max_samples=max_samples, max_queue=max_queue).start()
        self._lock = threading.Lock()  # orders submit against close, and the queue check against the put
        self._closed = False

    @property
    def stats(self):
        """The scheduler's counters (ticks, engine calls, images per tick)."""
        return self._scheduler.stats

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        with self._lock:
            check_submit(request, self._closed, self._scheduler.queued, self._max_queue)
            try:
                call = self._pipe.prepare(**call_arguments(request))
            except Exception as e:  # noqa: BLE001 - this request's own error (its prompt, its size): it fails alone
                future: concurrent.futures.Future = concurrent.futures.Future()
                future.set_running_or_notify_cancel()
                future.set_exception(e)
                return future
            return self._scheduler.enqueue(call, then=result_of)

    def close(self) -> None:
        """Finish the requests running, fail the queued ones, stop the scheduler's thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._scheduler.close(finish_running=True)


RUNNER = BatchingRunner  # what open_runner makes (benchmarks/serving.py names it in its report)
