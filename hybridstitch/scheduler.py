"""Continuous (step-level) batching: requests join and leave the running batch at step boundaries.

    with StepScheduler(pipe, max_samples=8) as scheduler:      # a worker thread runs the steps
        future = scheduler.submit(prompt="a cat", config="hybridstitch-30", num_inference_steps=28,
                                  generator=torch.Generator().manual_seed(0))
        image = future.result().images[0]

Each tick admits queued requests while fewer than ``max_samples`` images are in flight, then
runs ONE step of every image in flight (:func:`hybridstitch.step.step`: each engine once over all
the images that need it, whatever their request, preset, step count, guidance or arrival
time; every image its own timestep), then hands the finished requests their outputs. An image's
result is the same as in a direct ``pipe(...)`` call: stages, masks and caches are per image.

Requests are checked and encoded at :meth:`StepScheduler.submit`, in the caller's thread, so a
request no engine can serve (its size, a batch above the engines' largest profile, a ratio
without a bucket) is refused there with a :class:`HybridStitchError` before any work. The
queue is bounded: a full queue refuses too. A request that fails while running (an engine call
that raises, latents that stop being finite) fails alone: its future gets the error, the other
requests go on.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import checks
from .errors import HybridStitchError
from .pipeline import HybridStitchOutput, HybridStitchPipeline, PreparedCall


@dataclass
class _Request:
    call: PreparedCall
    future: Future
    then: Callable[[HybridStitchOutput], Any] | None = None
    admitted: bool = False


@dataclass
class SchedulerStats:
    ticks: int = 0
    engine_calls: int = 0
    completed: int = 0
    failed: int = 0
    samples_per_tick: list[int] = field(default_factory=list)


class StepScheduler:
    """Step-level batching over one pipeline (see the module docstring)."""

    def __init__(self, pipe: HybridStitchPipeline, max_samples: int = 8, max_queue: int = 64):
        max_samples, max_queue = checks.integer("max_samples", max_samples, 1), checks.integer("max_queue", max_queue, 1)
        self.pipe, self.max_samples, self.max_queue = pipe, max_samples, max_queue
        self.stats = SchedulerStats()
        self._queue: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._finish_running = False
        self._ids = 0

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, *args, **kwargs) -> Future:
        """Queue a request (``pipe(...)``'s arguments); the future resolves to its
        :class:`~hybridstitch.pipeline.HybridStitchOutput`. Bad input raises here, before any work."""
        kwargs.setdefault("progress", False)
        return self.enqueue(self.pipe.prepare(*args, **kwargs))

    def enqueue(self, call: PreparedCall, then: Callable[[HybridStitchOutput], Any] | None = None) -> Future:
        """Queue a call already made by ``pipe.prepare``. The future resolves to its output, or to
        ``then(output)`` (run on the scheduler's thread; an error there fails this request alone)."""
        images = len(call.samples)
        if images > self.max_samples:
            raise HybridStitchError(
                f"this request makes {images} images; the scheduler runs at most {self.max_samples} at once "
                "(max_samples): split the request, or raise max_samples"
            )
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise HybridStitchError("the scheduler is closed; make a new one")
            if len(self._queue) >= self.max_queue:
                raise HybridStitchError(
                    f"the queue is full ({self.max_queue} requests waiting): retry later, or raise max_queue"
                )
            for s in call.samples:  # ids unique across requests: a step orders its calls' rows by them
                s.id, self._ids = self._ids, self._ids + 1
                s.owner = call
            self._queue.append(_Request(call, future, then))
            self._wake.notify()
        return future

    @property
    def queued(self) -> int:
        """Requests waiting to be admitted."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return sum(len(r.call.samples) for r in self._running)

    # -- the loop ---------------------------------------------------------------------------------

    def _fits(self, rows: int) -> bool:
        """Whether both engines run ``rows`` rows in one call (TensorRT profiles end at the exported
        batch; ONNX Runtime graphs take any). A step's largest call has at most every row in flight."""
        for denoiser in (self.pipe.large, self.pipe.small):
            problem = getattr(denoiser, "batch_problem", None)
            if problem is not None and problem(rows) is not None:
                return False
        return True

    def _admit(self) -> None:
        with self._lock:
            while self._queue and not self._closed:
                samples = self._queue[0].call.samples
                if self._running:  # a request alone always runs: its batch was checked at submit
                    rows = sum(s.rows for r in self._running for s in r.call.samples) + sum(s.rows for s in samples)
                    if self.in_flight + len(samples) > self.max_samples or not self._fits(rows):
                        break
                request = self._queue.popleft()
                if request.future.set_running_or_notify_cancel():
                    request.admitted = True
                    self._running.append(request)

    def tick(self) -> bool:
        """Admit, run one step of everything in flight, complete what finished. False when idle."""
        self._admit()
        if not self._running:
            return False
        samples = [s for r in self._running for s in r.call.samples if not s.done]
        if samples:
            self.stats.engine_calls += self.pipe.advance(samples)
            self.stats.ticks += 1
            self.stats.samples_per_tick.append(len(samples))
        for request in [r for r in self._running if all(s.done for s in r.call.samples)]:
            self._running.remove(request)
            try:
                output = self.pipe.finish(request.call)
                request.future.set_result(output if request.then is None else request.then(output))
                self.stats.completed += 1
            except Exception as error:  # noqa: BLE001 -- the request's own failure, handed to its caller
                request.future.set_exception(error)
                self.stats.failed += 1
        return True

    def run_until_idle(self) -> None:
        """Run ticks in this thread until nothing is queued or in flight (no worker thread needed)."""
        while self.tick() or self._queue:
            pass

    def start(self) -> "StepScheduler":
        """Run the ticks in a worker thread until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hybridstitch-scheduler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._queue and not self._running:
                    self._wake.wait()
                if self._closed and not (self._finish_running and self._running):
                    return
            try:
                self.tick()
            except Exception as error:  # noqa: BLE001 -- a bug in a tick must not hang every caller
                for request in self._running:
                    if not request.future.done():
                        request.future.set_exception(error)
                self._running.clear()

    def close(self, finish_running: bool = False) -> None:
        """Stop the worker. Queued requests fail with a HybridStitchError; running ones fail too,
        or, with ``finish_running``, run to the end first (nothing new is admitted meanwhile)."""
        with self._lock:
            self._closed, self._finish_running = True, finish_running
            self._wake.notify_all()
            queued, self._queue = list(self._queue), deque()
        for request in queued:  # fail the waiting at once: a draining close may take a while
            if request.future.set_running_or_notify_cancel():  # False: cancelled by its caller
                request.future.set_exception(HybridStitchError(
                    "the scheduler shut down before this request ran; send it again"))
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif finish_running:
            while self._running:
                self.tick()
        for request in self._running:
            if not request.future.done():
                request.future.set_exception(HybridStitchError(
                    "the scheduler shut down while this request ran; send it again"))
        self._running.clear()

    def __enter__(self) -> "StepScheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def run_requests(large, small, flow_scheduler, requests: list[dict], guidance_scale: float) -> list:
    """Run ``requests`` together, step-level batched, on bare denoisers (the GPU suite's entry):
    each a dict of ``latents`` [1, C, h, w], ``cond`` (a CFG-batched
    :class:`~hybridstitch.conditioning.Conditioning`), ``config`` and ``num_inference_steps``.
    Returns each request's final latents."""
    latents = requests[0]["latents"]
    pipe = HybridStitchPipeline(large, small, flow_scheduler, device=latents.device, dtype=latents.dtype)
    samples, owners = [], []
    for i, r in enumerate(requests):
        made = pipe.samples(r["latents"], r["cond"], r["config"], r["num_inference_steps"], guidance_scale,
                            first_id=len(samples))
        for s in made:
            s.owner = i
        samples += made
        owners.append(made)
    while any(not s.done for s in samples):
        pipe.advance(samples)
    for s in samples:
        if s.error is not None:
            raise s.error
    return [torch.cat([s.latents for s in made]) for made in owners]


__all__ = ["SchedulerStats", "StepScheduler", "run_requests"]
